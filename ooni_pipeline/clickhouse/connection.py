"""One small interface to ClickHouse, on a server or embedded (chdb).

Assets talk to ``ClickHouse`` only: run a command, query into a DataFrame or rows,
stream a large result as bytes, insert a DataFrame or an Arrow table. Values always
travel as bound parameters (``{name:Type}`` placeholders, bound by the engine);
identifiers go through ``quote_identifier``.

Two backends:
- a server, through clickhouse-connect (``http(s)://user:password@host:port/db``);
- embedded chdb at a directory (``chdb:///abs/path``), through clickhouse-connect's
  chdb backend, plus chdb's own ``send_query`` for streaming, which is the only
  streaming path that neither buffers the result nor crawls row by row.

chdb lets one process at a time open a data directory, and a process can open only
one directory in its lifetime. Opening therefore waits on the lock, up to a bounded
timeout, and fails with a message that says what is going on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # annotations only: the code location loads without pandas and pyarrow
    import pandas as pd
    import pyarrow as pa

# Server results are read in blocks this large, and asked for zstd-compressed
# (clickhouse-connect inflates queries' responses, urllib3 a raw stream's).
STREAM_BLOCK = 1 << 20
STREAM_ENCODING = "zstd"
SERVER_COMPRESSION = "zstd"
_EXCEPTION_TAG_HEADER = "X-ClickHouse-Exception-Tag"
_EXCEPTION_TAIL = 64 * 1024
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# chdb's words for "another process holds this directory".
_LOCKED_MARKERS = (
    "Cannot lock file",
    "Error initializing EmbeddedServer",
    "Resource temporarily unavailable",
)


class ClickHouseError(RuntimeError):
    """A ClickHouse failure whose message is safe to show (no credentials)."""


def quote_identifier(name: str) -> str:
    """Validate a table or column name and return it quoted for SQL."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(f"invalid ClickHouse identifier: {name!r}")
    return f"`{name}`"


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _redact_text(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class ClickHouse:
    """An open connection. Use as a context manager, or call ``close()``.

    ``url`` is either ``chdb:///abs/path`` or an ``http(s)://`` server URL.
    """

    def __init__(
        self,
        url: str,
        *,
        lock_timeout_s: float = 600.0,
        lock_poll_s: float = 0.5,
        cluster: str | None = None,
    ):
        self.url = url
        self.display_url = redact_url(url)
        parts = urlsplit(url)
        self.embedded = parts.scheme == "chdb"
        self._secrets = [p for p in (parts.password,) if p]
        self._lock_timeout_s = lock_timeout_s
        self._lock_poll_s = lock_poll_s
        self._chdb_conn: Any = None
        self.path = parts.path if self.embedded else None
        # The ClickHouse cluster (``OONI_CLICKHOUSE_CLUSTER``) the tables the project owns
        # are created on; ``None``: one server. Embedded is always one server.
        self.cluster = None if self.embedded or not cluster else cluster
        if self.cluster is not None:
            quote_identifier(self.cluster)
        if self.embedded and not (self.path and self.path.startswith("/")):
            raise ClickHouseError(f"chdb URL needs an absolute path: {url!r}")
        self._client = self._open()

    # -- opening ----------------------------------------------------------------
    def _open(self) -> Any:
        import clickhouse_connect

        if not self.embedded:
            try:
                # No session: this object runs queries concurrently (a stream open while it
                # inserts or counts), and a server rejects a second request in a busy
                # session (SESSION_IS_LOCKED). Nothing here relies on session state.
                return clickhouse_connect.get_client(
                    dsn=self.url, compress=SERVER_COMPRESSION, autogenerate_session_id=False
                )
            except Exception as exc:  # re-raised with the password removed
                raise ClickHouseError(
                    f"cannot connect to ClickHouse at {self.display_url}: "
                    f"{_redact_text(str(exc), self._secrets)}"
                ) from None
        import os

        os.makedirs(self.path, exist_ok=True)
        deadline = time.monotonic() + self._lock_timeout_s
        waited = False
        while True:
            try:
                client = clickhouse_connect.get_client(dsn=f"chdb://{self.path}")
                if waited:
                    self._log_wait_end()
                return client
            except Exception as exc:
                message = str(exc)
                if "already initialized with path" in message:
                    raise ClickHouseError(
                        f"this process already opened embedded ClickHouse at another path; "
                        f"chdb allows one data directory per process ({self.path!r} requested): {message}"
                    ) from None
                if not any(marker in message for marker in _LOCKED_MARKERS):
                    raise ClickHouseError(
                        f"cannot open embedded ClickHouse at {self.path}: {message}"
                    ) from None
                if time.monotonic() >= deadline:
                    raise ClickHouseError(
                        f"embedded ClickHouse at {self.path} is held by another process; gave up after "
                        f"{self._lock_timeout_s:.0f} s. Only one process may open it at a time: "
                        "keep the 'clickhouse' pool limit at 1 in dagster.yaml, or use a ClickHouse server."
                    ) from None
                waited = True
                time.sleep(self._lock_poll_s)

    def _log_wait_end(self) -> None:
        import logging

        logging.getLogger(__name__).info(
            "embedded ClickHouse lock at %s acquired after waiting", self.path
        )

    def _chdb(self) -> Any:
        if self._chdb_conn is None:
            import chdb

            self._chdb_conn = chdb.connect(self.path)
        return self._chdb_conn

    def close(self) -> None:
        """Release the connection (and, embedded, the directory lock)."""
        if self._chdb_conn is not None:
            self._chdb_conn.close()
            self._chdb_conn = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> ClickHouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ----------------------------------------------------------------
    def _wrap(self, exc: Exception, sql: str) -> ClickHouseError:
        first_line = " ".join(sql.split())[:200]
        return ClickHouseError(_redact_text(f"{exc} (query: {first_line})", self._secrets))

    def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        """Run a statement; return its scalar result if any."""
        try:
            return self._client.command(sql, parameters=dict(parameters or {}))
        except Exception as exc:
            raise self._wrap(exc, sql) from None

    def query_df(self, sql: str, parameters: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """A small result as a DataFrame."""
        try:
            return self._client.query_df(sql, parameters=dict(parameters or {}))
        except Exception as exc:
            raise self._wrap(exc, sql) from None

    def query_rows(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[tuple]:
        """A small result as a list of tuples."""
        try:
            return list(self._client.query(sql, parameters=dict(parameters or {})).result_rows)
        except Exception as exc:
            raise self._wrap(exc, sql) from None

    def scalar(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        rows = self.query_rows(sql, parameters)
        return rows[0][0] if rows else None

    def stream(
        self,
        sql: str,
        parameters: Mapping[str, Any] | None = None,
        fmt: str = "CSV",
        prefetch: int = 4,
    ) -> Iterator[bytes]:
        """A large result as an iterator of byte chunks, never held whole.

        A background thread reads up to ``prefetch`` chunks ahead, so ClickHouse
        keeps producing while the consumer compresses or uploads (a server drops
        an HTTP query whose client stops reading for about 30 s).

        Use a format without a header (``CSV``, ``TSV``...): chdb repeats the
        header of ``*WithNames`` formats in every chunk; see ``header()``.
        """
        chunks = self._raw_stream(sql, dict(parameters or {}), fmt)
        if prefetch <= 0:
            yield from chunks
            return
        yield from _read_ahead(chunks, prefetch)

    def _raw_stream(
        self, sql: str, params: dict[str, Any], fmt: str
    ) -> Generator[bytes, None, None]:
        try:
            if self.embedded:
                result = self._chdb().send_query(sql, fmt, params=params)
                with result:
                    for chunk in result:
                        data = chunk.bytes()
                        if data:
                            yield data
            else:
                yield from self._server_stream(sql, params, fmt)
        except ClickHouseError:
            raise
        except Exception as exc:
            raise self._wrap(exc, sql) from None

    def _server_stream(
        self, sql: str, params: dict[str, Any], fmt: str
    ) -> Generator[bytes, None, None]:
        """The HTTP response in blocks of ``STREAM_BLOCK`` bytes, compressed on the wire.

        A server that fails after it has started answering appends a tagged exception
        block to the body and cuts the response: one block is held back until more
        arrives, so that block is not handed on as data, and the server's own message
        is raised instead of a bare transport error.
        """
        with self._client.raw_stream(
            sql,
            parameters=params,
            fmt=fmt,
            settings={"enable_http_compression": 1},
            transport_settings={"Accept-Encoding": STREAM_ENCODING},
        ) as response:
            tag = response.headers.get(_EXCEPTION_TAG_HEADER)
            pending = bytearray()
            seen = b""  # the end of what was handed on, for a block split across both
            try:
                # read1: one HTTP chunk at most, so the last one before a cut arrives
                # (read() loses a failing call's bytes; urllib3 2.8's stream() drops
                # bytes of chunked, compressed responses).
                while piece := response.read1(STREAM_BLOCK):
                    pending += piece
                    while len(pending) >= 2 * STREAM_BLOCK:
                        block = bytes(pending[:STREAM_BLOCK])
                        del pending[:STREAM_BLOCK]
                        seen = block[-_EXCEPTION_TAIL:]
                        yield block
            except Exception as exc:
                message = _server_failure(seen + pending, tag)
                raise self._wrap(message or exc, sql) from None
            message = _server_failure(seen + pending, tag)
            if message:
                raise self._wrap(message, sql)
            for start in range(0, len(pending), STREAM_BLOCK):
                yield bytes(pending[start : start + STREAM_BLOCK])

    def stream_gzip(
        self,
        sql: str,
        parameters: Mapping[str, Any] | None = None,
        fmt: str = "CSV",
        level: int = 6,
    ) -> Generator[bytes, None, None]:
        """A server's result as gzip compressed by the server itself (HTTP
        compression at ``level``), handed on as it arrives, never inflated here: an
        export stored as gzip is then compressed by the engine, not by Python.

        Server only (embedded, the engine writes files itself: ``file()``). A server
        failing mid-answer breaks the response, which raises here; the caller discards
        what it got."""
        if self.embedded:
            raise ClickHouseError("stream_gzip needs a ClickHouse server")
        try:
            with self._client.raw_stream(
                sql,
                parameters=dict(parameters or {}),
                fmt=fmt,
                settings={"enable_http_compression": 1, "http_zlib_compression_level": level},
                transport_settings={"Accept-Encoding": "gzip"},
            ) as response:
                encoding = response.headers.get("Content-Encoding", "")
                if encoding != "gzip":
                    raise ClickHouseError(
                        f"the server answered with {encoding or 'no'} encoding, not gzip"
                    )
                while piece := response.read1(STREAM_BLOCK, decode_content=False):
                    yield piece
        except ClickHouseError:
            raise
        except Exception as exc:
            raise self._wrap(exc, sql) from None

    def header(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[str]:
        """The column names a query would return, without running it for data."""
        try:
            result = self._client.query(
                f"SELECT * FROM ({sql}) LIMIT 0", parameters=dict(parameters or {})
            )
        except Exception as exc:
            raise self._wrap(exc, sql) from None
        return list(result.column_names)

    def insert_df(self, table: str, df: pd.DataFrame) -> None:
        quote_identifier(table)
        try:
            self._client.insert_df(table, df)
        except Exception as exc:
            raise self._wrap(exc, f"INSERT INTO {table}") from None

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        quote_identifier(table)
        try:
            self._client.insert_arrow(table, data)
        except Exception as exc:
            raise self._wrap(exc, f"INSERT INTO {table}") from None

    def raw_insert(self, table: str, data: Iterable[bytes], fmt: str) -> None:
        """Insert raw bytes in a ClickHouse input format (e.g. CSVWithNames), parsed by the engine.

        An error raised by ``data`` itself (e.g. a decompression limit) is the caller's
        and reaches it unchanged; ClickHouse's own errors become ``ClickHouseError``.
        """
        quote_identifier(table)
        source_error: list[Exception] = []

        def blocks() -> Generator[bytes, None, None]:
            try:
                yield from data
            except Exception as exc:
                source_error.append(exc)
                raise

        try:
            self._client.raw_insert(table, insert_block=blocks(), fmt=fmt)
        except Exception as exc:
            if source_error:
                raise source_error[0] from None
            raise self._wrap(exc, f"INSERT INTO {table} FORMAT {fmt}") from None

    def command_reading(
        self,
        statement: Callable[[str], str],
        data: Iterable[bytes],
        structure: str,
        fmt: str = "RowBinary",
    ) -> None:
        """Run ``statement(source)``, where ``source`` is a table function yielding the
        rows of ``data`` (bytes in input format ``fmt``, columns ``structure``), while
        ``data`` is still being produced: the engine parses and processes what has
        arrived (on its own threads) as this thread produces the rest. Embedded only.

        The bytes go through a FIFO in a private temporary directory, read by
        ``file()``. chdb's own streaming insert (``send_insert``) takes no
        ``INSERT ... SELECT`` and drops the errors of materialized views; the
        statement here is an ordinary query, so its errors reach the caller. An error
        raised by ``data`` itself reaches the caller unchanged (what the engine read
        until then is the caller's to discard).
        """
        if not self.embedded:
            raise ClickHouseError("command_reading needs embedded ClickHouse")
        import os
        import tempfile
        import threading

        with tempfile.TemporaryDirectory(prefix="ooni-stream-") as directory:
            fifo = os.path.join(directory, "input")
            os.mkfifo(fifo, 0o600)
            quote_identifier(fmt)
            sql = statement(f"file({_sql_string(fifo)}, {fmt}, {_sql_string(structure)})")
            failure: list[BaseException] = []

            def run() -> None:
                try:
                    self.command(sql)
                except BaseException as exc:  # handed to the caller below
                    failure.append(exc)

            query = threading.Thread(target=run, name="clickhouse statement", daemon=True)
            query.start()
            source_error: BaseException | None = None
            opened = False
            try:
                writer = _open_fifo_writer(fifo, query)
                if writer is not None:
                    opened = True
                    with writer:
                        for block in data:
                            writer.write(block)
            except BrokenPipeError:
                pass  # the statement stopped reading: it failed, its error is raised below
            except BaseException as exc:
                source_error = exc
            if not opened:
                # Interrupted (a run cancelled) before the engine opened the FIFO: it
                # still will, and would wait forever for a writer. Open and close the
                # write end once it has, so it reads the end of the data.
                late = _open_fifo_writer(fifo, query)
                if late is not None:
                    late.close()
            query.join()
        if source_error is not None:
            raise source_error
        if failure:
            raise failure[0]

    def count(self, table: str) -> int:
        return int(self.scalar(f"SELECT count() FROM {quote_identifier(table)}"))

    def columns(self, table: str) -> list[tuple[str, str]]:
        """(name, type) of each column of a table, in order."""
        return [
            (str(name), str(type_))
            for name, type_ in self.query_rows(
                "SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                "AND table = {table:String} ORDER BY position",
                {"table": table},
            )
        ]


# A server before 25.11 ends a result failing after its headers with the exception's
# text as its last line of data (ClickHouse#9579, #68800): "Code: N. DB::Exception:
# ... (NAME) (version X)", "Code: 210. DB::NetException: ...", before 21.x "Code: N,
# e.displayText() = ...". All end with ")"; no row ClickHouse writes as CSV does (its
# last field is a number, \N, or quoted: strings, arrays, maps, tuples as text, IPs).


class StreamTail:
    """The last bytes of a CSV stream, to tell whether it ends with an old server's
    error text instead of its last row (checked before such a stream is published)."""

    KEEP = 4096

    def __init__(self) -> None:
        self.tail = b""

    def add(self, block: bytes) -> None:
        self.tail = (
            block[-self.KEEP :] if len(block) >= self.KEEP else (self.tail + block)[-self.KEEP :]
        )

    def ends_with_server_error(self) -> bool:
        return self.tail.rstrip(b"\r\n").endswith(b")")


def _server_failure(tail: bytes, tag: str | None) -> Exception | None:
    """The server's exception, if ``tail`` ends a response with its tagged block."""
    if not tag or b"__exception__" not in tail:
        return None
    from clickhouse_connect.driver.transform import extract_exception_with_tag

    message = extract_exception_with_tag(tail, tag)
    return RuntimeError(f"ClickHouse failed while streaming: {message}") if message else None


def _sql_string(text: str) -> str:
    """``text`` as a quoted SQL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _open_fifo_writer(path: str, reader: Any, poll_s: float = 0.01) -> BinaryIO | None:
    """The write end of FIFO ``path`` once the engine has opened it for reading; None
    if the thread ``reader`` that runs the statement ended first (the statement failed
    before reading). Opened without blocking, as a plain open would wait forever for a
    reader that never comes."""
    import errno
    import fcntl
    import os

    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            if not reader.is_alive():
                return None
            time.sleep(poll_s)
            continue
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "wb")


_END = object()


def _read_ahead(chunks: Generator[bytes, None, None], depth: int) -> Iterator[bytes]:
    """Iterate ``chunks`` in a background thread, up to ``depth`` items ahead."""
    import queue
    import threading

    buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        buffer.put(chunk, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer below
            failure.append(exc)
        finally:
            while not stop.is_set():
                try:
                    buffer.put(_END, timeout=0.5)
                    break
                except queue.Full:
                    continue

    thread = threading.Thread(target=produce, name="clickhouse read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                break
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()
        thread.join(timeout=30)
        if not thread.is_alive():
            chunks.close()  # cancels an unfinished query
