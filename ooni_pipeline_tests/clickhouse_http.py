"""A ClickHouse HTTP endpoint served by the real engine (chdb, in-process), for tests.

No ClickHouse server can be installed where the tests run, yet production talks to
one over HTTP through clickhouse-connect. This endpoint speaks the part of ClickHouse's
HTTP interface that clickhouse-connect uses, and hands every statement to chdb, so the
server path runs against the real engine. It follows ClickHouse 26.x where the two
differ: what a response looks like is taken from the server's behaviour, not invented.

Served: GET and POST on ``/`` (``/ping`` too); the query in the ``query`` parameter
and/or the body (joined by a line feed, as the server does), or in multipart form
fields; ``param_*`` bound by the engine; ``database``; ``default_format`` and a
trailing ``FORMAT``; every other parameter applied as a setting (an unknown one fails
as on the server); GET is ``readonly=2``; inserts stream their data into the engine
(``send_insert``), whatever the format, ``VALUES`` included; results stream in
chunks as the engine produces them, after the first ``buffer_size`` bytes (1 MiB),
or whole with ``wait_end_of_query=1``; request bodies in gzip, deflate, zstd or lz4;
responses compressed (zstd, lz4, gzip, deflate, the server's order of preference)
when ``enable_http_compression=1`` and the client accepts it, gzip and deflate at
``http_zlib_compression_level`` (3 by default, as on the server), a SELECT's gzip by
the engine itself (``file()`` into a FIFO, streamed whatever the format, as the
server compresses in the engine); errors as the server
sends them (status by exception code, ``X-ClickHouse-Exception-Code``, ``Code: N.
DB::Exception: ...`` body), and after the headers as a tagged block followed by a
broken chunked stream (or, in ``old_server()`` mode, as servers before 25.11: no
tag, the exception's text as data and a complete stream); faults injected into a
chosen result after some bytes (``failing_results``); named sessions (``session_id``) with their own settings,
locked while a request runs in them (``SESSION_IS_LOCKED``, 373); users with
passwords by Basic auth, ``X-ClickHouse-User``/``Key`` or URL parameters (516 when
wrong).

Clusters are stood in for (``cluster()``): statements are recorded as sent and run
on the one node. Not served (see docs/development.md): TLS, the native protocol, quotas, roles and
grants, progress headers, external data, ``client_protocol_version`` block info,
the server's own concurrency limits and memory accounting; a streamed insert
violating a table's CONSTRAINT (chdb's ``send_insert`` drops the block and reports
it written, where a server answers VIOLATED_CONSTRAINT, 469).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import secrets
import select
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import chdb

from ooni_pipeline_tests.clickhouse_wire import (
    BLOCK,
    CONTENT_TYPES,
    STATUS_BY_ERROR_NAME,
    Body,
    Chunked,
    Decoded,
    Output,
    RequestLog,
    Statement,
    choose_compression,
    parse_statement,
    sql_identifier,
    sql_literal,
)

MAX_FORM_BYTES = 64 << 20
# Request parameters the server consumes itself; every other one is a setting.
TRANSPORT_PARAMS = {
    "query", "database", "default_format", "user", "password", "quota_key", "query_id",
    "session_id", "session_timeout", "session_check", "close_session", "compress",
    "decompress", "buffer_size", "wait_end_of_query", "client_protocol_version", "role",
    "stacktrace",
}  # fmt: skip
# Statements whose answer is a result set (the server names its format in a header).
RESULT_STATEMENTS = {"SELECT", "WITH", "SHOW", "DESC", "DESCRIBE", "EXISTS", "EXPLAIN", "CHECK"}
# Formats whose chunks concatenate into the whole: chdb streams these. Others (a header
# or footer, like JSON or CSVWithNames) are produced whole by the engine, then sent.
STREAMED_FORMATS = {
    "Native", "TabSeparated", "TSV", "TabSeparatedRaw", "TSVRaw", "CSV", "RowBinary",
    "JSONEachRow", "JSONCompactEachRow", "JSONLines", "NDJSON",
}  # fmt: skip
_ENGINE_ERROR = re.compile(r"Code: (\d+)\. (DB::Exception: .*?)\s*$", re.S)


def endpoint_url(port: int, user: str, password: str, database: str = "default") -> str:
    """The URL clickhouse-connect takes for the endpoint on ``port``, credentials in it."""
    return f"http://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}/{database}"


class ServerError(Exception):
    """A ClickHouse exception, with its code and the name of its code."""

    def __init__(self, code: int, name: str, text: str):
        super().__init__(text)
        self.code, self.name, self.text = code, name, text


# -- the engine ---------------------------------------------------------------------


def connect_engine(path: str) -> Any:
    """A chdb connection to ``path`` with chdb 4's interface, whatever chdb runs here.

    The endpoint also runs under chdb 3.3 (ClickHouse 24.8, the release OONI's cluster
    runs; see ``serve()``), which has one connection per process, runs one query at a
    time (a second query while a result streams never returns), binds no parameters
    and takes no streamed inserts: ``_Chdb3`` gives each request a connection of its
    own on top of that one."""
    if _CHDB3:
        return _Chdb3(path)
    return chdb.connect(path)


_CHDB3 = int(getattr(chdb, "__version__", "0").split(".")[0]) <= 3


class _Chdb3:
    """A request's (or session's) connection on chdb 3's one connection, per process.

    A query runs whole under one lock, with the connection's database, settings and
    parameters set just before it and the settings reset after, as separate
    connections would keep them apart. Parameters are bound by the engine as a server
    binds them (``SET param_x = 'v'``: the value's text, parsed by the placeholder's
    type); an insert's data is spooled to a file the engine reads (``FROM INFILE``).

    Not served on this engine: results streamed as they are produced (each is
    produced whole, then sent in blocks) and ``readonly`` (a GET's ``readonly=2``
    could not be reset on the shared connection): the streaming and the wire are
    tested against chdb 4's engine, what runs here is the SQL."""

    _lock = threading.Lock()
    _engine: Any = None
    _ASSIGNMENT = re.compile(
        r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*('(?:[^'\\]|\\.)*'|[^,]+?)\s*(?:,|$)", re.S
    )
    _DROP = re.compile(r"\s*DROP\s+(TABLE|DATABASE|DICTIONARY|VIEW)\s", re.I)
    _USE = re.compile(r"\s*USE\s+(.+?)\s*;?\s*$", re.S | re.I)

    def __init__(self, path: str):
        with self._lock:
            if _Chdb3._engine is None:
                _Chdb3._engine = chdb.connect(path)
        self._database = "default"
        self._settings: dict[str, str] = {}

    def close(self) -> None:
        """The engine stays up, as a server does."""

    def _assignments(self, sql: str) -> dict[str, str] | None:
        """A ``SET`` statement's assignments; None for another statement. A ``SET``
        this cannot split is refused: sent as is, it would stay on the shared engine."""
        if not re.match(r"\s*SET\s", sql, re.I):
            return None
        body, values, at = sql.strip().rstrip(";")[3:], {}, 0
        while at < len(body):
            match = self._ASSIGNMENT.match(body, at)
            if match is None:
                raise ServerError(48, "NOT_IMPLEMENTED", "Code: 48. DB::Exception: this SET is "
                                  "not served by the 24.8 endpoint (values must be literals). "
                                  "(NOT_IMPLEMENTED)")  # fmt: skip
            value = match.group(2)
            if not value.startswith("'") and re.search(r"--|#|/\*", value):
                raise ServerError(48, "NOT_IMPLEMENTED", "Code: 48. DB::Exception: a comment "
                                  "in a SET is not served by the 24.8 endpoint. (NOT_IMPLEMENTED)")  # fmt: skip
            values[match.group(1)] = value
            at = match.end()
        return values

    def query(self, sql: bytes | str, fmt: str = "TSV", params: dict | None = None) -> Any:
        text = sql.decode() if isinstance(sql, bytes) else sql
        assignments = self._assignments(text)
        if assignments is not None:
            settings = dict(self._settings)
            for name, value in assignments.items():
                if value.upper() == "DEFAULT":
                    settings.pop(name, None)
                elif name != "readonly":
                    settings[name] = value
            # an unknown setting or a bad value fails here, and changes nothing
            self._run("SELECT 1", "TSV", None, settings)
            self._settings = settings
            return _Result(b"")
        use = self._USE.match(text)
        if use:
            self._run(text, "TSV", None)
            self._database = use.group(1)
            return _Result(b"")
        return self._run(text, fmt, params)

    def _run(
        self, sql: str, fmt: str, params: dict | None, settings: dict[str, str] | None = None
    ) -> _Result:
        engine = _Chdb3._engine
        settings = self._settings if settings is None else settings
        bound = set(params or {}) | {n[6:] for n in settings if n.startswith("param_")}
        missing = _placeholders(sql) - bound
        if missing:  # the engine would bind what an earlier request left set
            name = sorted(missing)[0]
            raise Exception(
                f"Code: 456. DB::Exception: Substitution `{name}` is not set. "
                "(UNKNOWN_QUERY_PARAMETER)"
            )
        assignments = [f"{n} = {v}" for n, v in settings.items()]
        assignments += [f"param_{k} = {sql_literal(str(v))}" for k, v in (params or {}).items()]
        with self._lock:
            try:
                engine.query(f"USE {self._database}", "TSV")
                if assignments:
                    engine.query("SET " + ", ".join(assignments), "TSV")
                try:
                    result = engine.query(sql, fmt)
                except Exception as exc:
                    # clickhouse-local has no thread finishing drops: a table dropped
                    # SYNC is gone but the drop answers UNFINISHED; a server waits and
                    # answers success.
                    if not (self._DROP.match(sql) and "Code: 341." in str(exc)):
                        raise
                    result = None
                return _Result(result.bytes() if result is not None else b"", result)
            finally:
                if settings:
                    engine.query("SET " + ", ".join(f"{n} = DEFAULT" for n in settings), "TSV")

    def send_query(self, sql: bytes | str, fmt: str, params: dict | None = None) -> _Result:
        return self.query(sql, fmt, params)

    def send_insert(self, insert_sql: str, fmt: str) -> _Insert3:
        return _Insert3(self, insert_sql, fmt)


_QUOTED_OR_COMMENT = re.compile(
    r"'(?:[^'\\]|\\.)*'|`(?:[^`\\]|\\.)*`|\"(?:[^\"\\]|\\.)*\""
    r"|\$(\w*)\$.*?\$\1\$|--[^\n]*|#[^\n]*|/\*.*?\*/",
    re.S,
)
_PLACEHOLDER = re.compile(r"\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*:")


def _placeholders(sql: str) -> set[str]:
    """The query parameters ``sql`` names (``{name:Type}``), outside quotes and comments."""
    return set(_PLACEHOLDER.findall(_QUOTED_OR_COMMENT.sub(" ", sql)))


class _Result:
    """A whole result, also iterable as a stream's blocks."""

    def __init__(self, data: bytes, result: Any = None):
        self.data = data
        self.rows_read = getattr(result, "rows_read", lambda: 0)() if result is not None else 0

    def bytes(self) -> bytes:
        return self.data

    def __iter__(self) -> Iterator[_Result]:
        for at in range(0, len(self.data), BLOCK):
            yield _Result(self.data[at : at + BLOCK])

    def close(self) -> None:
        pass


@dataclass
class _Written:
    rows_written: int
    bytes_written: int
    elapsed: float


class _Insert3:
    """An insert's data spooled to a file, then read by the engine whole."""

    _SETTINGS = re.compile(rb"\s+SETTINGS\s+.*$", re.S | re.I)

    def __init__(self, conn: _Chdb3, insert_sql: str, fmt: str):
        self._conn, self._fmt = conn, fmt
        head = insert_sql.encode()
        match = self._SETTINGS.search(head)
        self._head, self._settings = (
            (head[: match.start()], head[match.start() :]) if match else (head, b"")
        )
        self._file = tempfile.NamedTemporaryFile(prefix="chdb3-insert-", suffix=".data")
        self._size = 0

    def append(self, data: bytes) -> None:
        self._file.write(data)
        self._size += len(data)

    def finish(self) -> _Written:
        self._file.flush()
        started = time.monotonic()
        try:
            if self._fmt == "Values":  # text, with expressions: parsed as a statement's
                self._file.seek(0)
                sql = b"%s%s VALUES %s" % (self._head, self._settings, self._file.read())
                result = self._conn.query(sql, "TSV")
                return _Written(result.rows_read, self._size, time.monotonic() - started)
            sql = b"%s FROM INFILE %s COMPRESSION 'none'%s FORMAT %s" % (
                self._head, sql_literal(self._file.name).encode(), self._settings,
                self._fmt.encode(),
            )  # fmt: skip
            result = self._conn.query(sql, "TSV")
            return _Written(result.rows_read, self._size, time.monotonic() - started)
        finally:
            self._file.close()

    def cancel(self) -> None:
        self._file.close()


# -- sessions ---------------------------------------------------------------------


@dataclass
class _Session:
    conn: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    expires: float = 0.0


def _once(action: Callable[[], Any]) -> Callable[[], None]:
    """``action``, run at the first call only."""
    done: list[bool] = []

    def run() -> None:
        if not done:
            done.append(True)
            action()

    return run


def _close(chunks: Iterator[bytes]) -> None:
    """Close a result's generator (its engine query ends); twice is harmless."""
    close = getattr(chunks, "close", None)
    if close:
        close()


class ClickHouseHTTP:
    """The endpoint on 127.0.0.1, serving the chdb data directory ``path``.

    ``users`` maps user names to passwords. The process's embedded engine is shared:
    each request runs on its own chdb connection, opened for it (or for its session)
    and closed after; ``keep_engine()`` holds the engine up meanwhile.
    """

    def __init__(self, path: str, users: dict[str, str] | None = None):
        self.path = str(path)
        self.users = dict(users or {"default": ""})
        self.log: list[RequestLog] = []
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._sessions_lock = threading.Lock()
        self._keeper: Any = None
        self._busy = threading.Condition()
        self._requests = 0  # being served: each holds an engine connection
        self._fifos = tempfile.mkdtemp(prefix="chdb-http-")  # engine-compressed results
        # False: a server before 25.11, which sends no exception tag and ends a result
        # failing after its headers with the exception's text as data, status 200
        # and a complete stream (ClickHouse#9579, #68800); see ``old_server()``.
        self.exception_tag = True
        self._cluster_name: str | None = None  # see cluster()
        self.profile: dict[
            str, str
        ] = {}  # settings of every request, as a server's default profile
        self.statements: list[str] = []
        self._result_faults: list[tuple[bytes, int]] = []
        conn = connect_engine(self.path)
        try:
            version, self.timezone, self.http_compression = (
                conn.query(
                    "SELECT version(), timezone(), getSetting('enable_http_compression')", "TSV"
                )
                .bytes()
                .decode()
                .split()
            )
            rows = conn.query(
                "SELECT number, errorCodeToName(number) FROM numbers(2000) "
                "WHERE errorCodeToName(number) != ''",
                "TSV",
            ).bytes()
        finally:
            conn.close()
        self.version = version
        # A server before 25.11 sends no exception tag (see ``old_server()``).
        self.exception_tag = tuple(int(x) for x in version.split(".")[:2]) >= (25, 11)
        self.error_names = {
            int(c): n for c, n in (r.split("\t") for r in rows.decode().split("\n") if r)
        }
        self._codes = {name: code for code, name in self.error_names.items()}
        self._status = {
            self._codes[name]: status for status, names in STATUS_BY_ERROR_NAME.items()
            for name in names if name in self._codes
        }  # fmt: skip
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with endpoint._busy:
                    endpoint._requests += 1
                try:
                    endpoint._serve(self)
                finally:
                    with endpoint._busy:
                        endpoint._requests -= 1
                        endpoint._busy.notify_all()

            do_POST = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, user: str, password: str, database: str = "default") -> str:
        return endpoint_url(self.port, user, password, database)

    def keep_engine(self) -> None:
        """Keep the engine up, as a running server does, until ``release_engine()``.

        chdb shuts its engine down when the process's last connection closes (Memory
        tables are emptied, the next request pays a restart), and keeps the data
        directory locked while one is open: a test holds the engine while it uses the
        endpoint, and lets it go after, so that embedded tests can take the lock.
        """
        if self._keeper is None:
            self._keeper = connect_engine(self.path)

    def release_engine(self, wait_s: float = 30.0) -> None:
        """Let the engine go once the requests still being served end (a request whose
        client went away ends at its next write), and with them every session."""
        with self._busy:
            self._busy.wait_for(lambda: self._requests == 0, timeout=wait_s)
        self.end_sessions()
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None

    def end_sessions(self) -> None:
        """Close every idle session (a test's sessions end with the test)."""
        with self._sessions_lock:
            for key, session in list(self._sessions.items()):
                if session.lock.acquire(blocking=False):
                    session.conn.close()
                    del self._sessions[key]

    @contextmanager
    def old_server(self) -> Iterator[None]:
        """Answer as a server before 25.11 for the block (see ``exception_tag``)."""
        before, self.exception_tag = self.exception_tag, False
        try:
            yield
        finally:
            self.exception_tag = before

    @contextmanager
    def server_timezone(self, zone: str) -> Iterator[None]:
        """For the block, a server whose time zone is ``zone`` (its default profile's
        ``session_timezone``): what ``timezone()`` answers and a plain DateTime means."""
        self.profile["session_timezone"] = zone
        try:
            yield
        finally:
            self.profile.pop("session_timezone", None)

    @contextmanager
    def cluster(self, name: str) -> Iterator[list[str]]:
        """For the block, stand in for one node of cluster ``name``: every statement is
        recorded as sent (the list yielded), then run on this one node with its
        ``ON CLUSTER`` clause and its engines' replication removed (no Keeper runs
        here): ``ReplicatedX('<path>', '<replica>'[, args])`` becomes ``X([args])``."""
        self._cluster_name, self.statements = name, []
        try:
            yield self.statements
        finally:
            self._cluster_name = None

    def _on_one_node(self, head: bytes) -> bytes:
        self.statements.append(head.decode("utf-8", "replace")[:20000])
        head = re.sub(rb"\s+ON\s+CLUSTER\s+(`[^`]+`|\w+)", b"", head, count=1)
        return re.sub(rb"Replicated(\w*MergeTree)\(\s*'[^']*'\s*,\s*'[^']*'\s*,?\s*", rb"\1(", head)

    @contextmanager
    def failing_results(self, pattern: str, after_bytes: int) -> Iterator[None]:
        """For the block, a result whose query contains ``pattern`` fails in the engine
        (MEMORY_LIMIT_EXCEEDED, as a server's memory limit strikes mid-query) once
        ``after_bytes`` of it are out, at a block boundary, or at its end if shorter:
        the fault a real failure brings, at the engine's side of the wire."""
        fault = (pattern.encode(), after_bytes)
        self._result_faults.append(fault)
        try:
            yield
        finally:
            self._result_faults.remove(fault)

    def _with_faults(self, sql: bytes, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for pattern, after in list(self._result_faults):
            if pattern in sql:
                return self._failing_after(chunks, after)
        return chunks

    def _failing_after(self, chunks: Iterator[bytes], after: int) -> Iterator[bytes]:
        sent = 0
        try:
            for data in chunks:
                if sent >= after:
                    break
                sent += len(data)
                yield data
            raise self.error(
                "MEMORY_LIMIT_EXCEEDED",
                "Memory limit (for query) exceeded: injected by the test endpoint",
            )
        finally:
            _close(chunks)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.release_engine()
        shutil.rmtree(self._fifos, ignore_errors=True)

    # -- errors -------------------------------------------------------------------
    def error(self, name: str, message: str) -> ServerError:
        code = self._codes.get(name, 1001)
        return ServerError(code, name, self._text(code, f"DB::Exception: {message}. ({name})"))

    def _text(self, code: int, exception: str) -> str:
        if "(version " in exception:
            return f"Code: {code}. {exception}"
        return f"Code: {code}. {exception} (version {self.version})"

    def engine_error(self, exc: Exception) -> ServerError:
        match = _ENGINE_ERROR.search(str(exc))
        if not match:
            return self.error("UNKNOWN_EXCEPTION", str(exc).strip())
        code = int(match.group(1))
        return ServerError(code, self.error_names.get(code, ""), self._text(code, match.group(2)))

    # -- one request --------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        entry = RequestLog(
            h.command, {k: ("***" if k == "password" else v) for k, v in params.items()}
        )
        self.log.append(entry)
        length = h.headers.get("Content-Length")
        body = Body(
            h.rfile,
            int(length) if length else None,
            "chunked" in h.headers.get("Transfer-Encoding", ""),
        )
        tag = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(16))
        query_id = (
            params.get("query_id") or h.headers.get("X-ClickHouse-Query-Id") or str(uuid.uuid4())
        )
        base = {
            "X-ClickHouse-Server-Display-Name": "chdb-http",
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": params.get("session_timezone")
            or self.profile.get("session_timezone")
            or self.timezone,
        }
        if self.exception_tag:
            base["X-ClickHouse-Exception-Tag"] = tag
        session: _Session | None = None
        try:
            if url.path.rstrip("/") == "/ping":
                body.drain()
                return self._reply(h, entry, 200, base, b"Ok.\n")
            if url.path not in ("", "/"):
                body.drain()
                raise self.error("UNKNOWN_TYPE_OF_QUERY", f"There is no handle {url.path}")
            user = self._authenticate(h, params)
            content_type = h.headers.get("Content-Type", "")
            if content_type.startswith("multipart/form-data"):
                params.update(self._form(h, body, content_type))
                body = Body(h.rfile, 0, False)
            session, conn = self._connection(user, params)
            release = (  # when the query is over (see _execute), or here at the latest
                _once(lambda: self._release(session, params)) if session else lambda: None
            )
            try:
                self._execute(h, entry, conn, session, params, body, base, tag, release)
            finally:
                if session is None:
                    conn.close()
                release()
        except ServerError as exc:
            try:  # as the server does: read the rest of the body, so the client sees the error
                body.drain()
            except (OSError, ValueError):
                h.close_connection = True
            entry.status = self._status.get(exc.code, 500)
            headers = dict(base, **{"X-ClickHouse-Exception-Code": str(exc.code)})
            headers["Content-Type"] = "text/plain; charset=UTF-8"
            self._reply(h, entry, entry.status, headers, (exc.text + "\n").encode())
        except (BrokenPipeError, ConnectionError):
            h.close_connection = True

    def _reply(self, h: Any, entry: RequestLog, status: int, headers: dict, data: bytes) -> None:
        entry.status = status
        h.send_response(status)
        for name, value in headers.items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        entry.body_bytes += len(data)

    def _authenticate(self, h: Any, params: dict[str, str]) -> str:
        user, password = h.headers.get("X-ClickHouse-User"), h.headers.get("X-ClickHouse-Key")
        auth = h.headers.get("Authorization", "")
        if user is not None or password is not None:
            if auth or "user" in params or "password" in params:
                raise self.error(
                    "AUTHENTICATION_FAILED",
                    "Invalid authentication: it is not allowed to use X-ClickHouse HTTP headers "
                    "and other authentication methods simultaneously",
                )
        elif auth:
            if "user" in params or "password" in params:
                raise self.error(
                    "AUTHENTICATION_FAILED",
                    "Invalid authentication: it is not allowed to use Authorization HTTP header "
                    "and authentication via parameters simultaneously",
                )
            scheme, _, info = auth.partition(" ")
            if scheme.lower() != "basic":
                raise self.error(
                    "AUTHENTICATION_FAILED",
                    f"Invalid authentication: '{scheme}' HTTP Authorization scheme is not supported",
                )
            user, _, password = base64.b64decode(info).decode().partition(":")
        else:
            user, password = params.get("user", "default"), params.get("password", "")
        user = user or "default"
        if self.users.get(user) != (password or ""):
            raise self.error(
                "AUTHENTICATION_FAILED",
                f"{user}: Authentication failed: password is incorrect, or there is no user "
                "with such name.",
            )
        return user

    def _form(self, h: Any, body: Body, content_type: str) -> dict[str, str]:
        data = Decoded(body, h.headers.get("Content-Encoding", "")).read(MAX_FORM_BYTES + 1)
        body.drain()
        if len(data) > MAX_FORM_BYTES:
            raise self.error("QUERY_IS_TOO_LARGE", "The form is too large for this endpoint")
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + data
        )
        fields: dict[str, str] = {}
        for part in message.iter_parts():
            if part.get_filename() is not None:
                raise self.error("NOT_IMPLEMENTED", "external data is not served by this endpoint")
            name = part.get_param("name", header="content-disposition")
            fields[str(name)] = part.get_payload(decode=True).decode()
        return fields

    def _connection(self, user: str, params: dict[str, str]) -> tuple[_Session | None, Any]:
        session_id = params.get("session_id")
        if not session_id:
            return None, connect_engine(self.path)
        try:
            timeout = int(params.get("session_timeout", "60"))
        except ValueError:
            raise self.error(
                "INVALID_SESSION_TIMEOUT", f"Invalid session timeout: '{params['session_timeout']}'"
            ) from None
        now = time.monotonic()
        with self._sessions_lock:
            for key, old in list(self._sessions.items()):
                if old.expires < now and old.lock.acquire(blocking=False):
                    old.conn.close()
                    del self._sessions[key]
            session = self._sessions.get((user, session_id))
            if session is None:
                if params.get("session_check") == "1":
                    raise self.error("SESSION_NOT_FOUND", f"Session {session_id} not found")
                session = self._sessions[(user, session_id)] = _Session(connect_engine(self.path))
            if not session.lock.acquire(blocking=False):
                raise self.error(
                    "SESSION_IS_LOCKED", f"Session {session_id} is locked by a concurrent client"
                )
            session.expires = now + timeout
        return session, session.conn

    def _release(self, session: _Session, params: dict[str, str]) -> None:
        session.expires = time.monotonic() + int(params.get("session_timeout", "60"))
        session.lock.release()

    def _run(
        self, conn: Any, sql: bytes | str, fmt: str = "TSV", params: dict | None = None
    ) -> Any:
        try:
            return conn.query(sql, fmt, params=params or {})
        except Exception as exc:
            raise self.engine_error(exc) from None

    def _apply_settings(
        self, conn: Any, session: _Session | None, settings: dict[str, str]
    ) -> dict[str, tuple[str, bool]]:
        """Apply request settings; return what restores a session's own values."""
        restore: dict[str, tuple[str, bool]] = {}
        if not settings:
            return restore
        for name in settings:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise self.error("UNKNOWN_SETTING", f"Unknown setting '{name}'")
        if session is not None:
            names = ", ".join(sql_literal(n) for n in settings)
            result = self._run(
                conn,
                f"SELECT name, value, changed FROM system.settings WHERE name IN ({names})",
                "JSONEachRow",
            )
            for line in result.bytes().splitlines():
                row = json.loads(line)
                restore[row["name"]] = (row["value"], bool(row["changed"]))
        self._run(conn, "SET " + ", ".join(f"{n} = {sql_literal(v)}" for n, v in settings.items()))
        return restore

    def _restore_settings(self, conn: Any, restore: dict[str, tuple[str, bool]]) -> None:
        for name, (value, changed) in restore.items():
            try:
                conn.query(f"SET {name} = {sql_literal(value) if changed else 'DEFAULT'}", "TSV")
            except Exception:
                pass

    def _execute(
        self, h: Any, entry: RequestLog, conn: Any, session: _Session | None,
        params: dict[str, str], body: Body, base: dict[str, str], tag: str,
        release: Callable[[], None],
    ) -> None:  # fmt: skip
        settings = dict(self.profile) | {
            k: v
            for k, v in params.items()
            if k not in TRANSPORT_PARAMS and not k.startswith("param_")
        }
        if h.command == "GET" and session is None and settings.get("readonly", "0") == "0":
            settings["readonly"] = "2"
        bound = {k[len("param_") :]: v for k, v in params.items() if k.startswith("param_")}
        if params.get("database"):
            self._run(conn, f"USE {sql_identifier(params['database'])}")
        restore = self._apply_settings(conn, session, settings)

        @_once
        def finish() -> None:
            """The query is over: the session's own settings back, then the session
            free, before the response's end reaches the client (which may send its next
            request in the session at once, as it may to a server)."""
            self._restore_settings(conn, restore)
            release()

        try:
            max_query_size = int(settings.get("max_query_size", 262144))
            encoding = h.headers.get("Content-Encoding", "")
            if encoding.strip().lower() not in Decoded.METHODS:
                raise self.error("NOT_IMPLEMENTED", f"Unknown compression method '{encoding}'")
            stream = Decoded(body, encoding)
            head = params.get("query", "").encode()
            head += b"\n" if head else b""
            while len(head) <= max_query_size:
                data = stream.read(max_query_size + 1 - len(head))
                if not data:
                    break
                head += data
            if self._cluster_name is not None:
                head = self._on_one_node(head)
            statement = parse_statement(head)
            # VALUES with bound parameters: the engine substitutes them in the statement
            values_with_params = statement.insert_format == "Values" and bound
            if statement.insert_sql is not None and not values_with_params:
                self._insert(h, entry, conn, statement, head, stream, base)
                return
            if len(head) > max_query_size:
                raise self.error(
                    "SYNTAX_ERROR",
                    f"Syntax error: failed at position {max_query_size}: Max query size exceeded",
                )
            if not head.strip():
                raise self.error("SYNTAX_ERROR", "Empty query")
            fmt = statement.output_format or params.get("default_format") or "TabSeparated"
            headers = dict(base)
            accept = h.headers.get("Accept-Encoding", "")
            method = (
                choose_compression(accept)
                if settings.get("enable_http_compression", self.http_compression) in ("1", "true")
                else None
            )
            wait = params.get("wait_end_of_query") == "1"
            hold = float("inf") if wait else int(params.get("buffer_size", BLOCK))
            zlib_level, readonly = 3, "0"
            if method in ("gzip", "deflate"):
                zlib_level, readonly = self._zlib_settings(conn)
            out = Output(method, zlib_level)
            if statement.keyword in RESULT_STATEMENTS:
                headers["X-ClickHouse-Format"] = fmt
                headers["Content-Type"] = CONTENT_TYPES.get(fmt, "application/octet-stream")
                # After the format name, only an end: SETTINGS may follow FORMAT, and
                # file()'s INSERT would not take them there.
                tail = head[statement.output_format_end :] if statement.output_format_end else b""
                if (
                    method == "gzip"
                    and statement.keyword in ("SELECT", "WITH")
                    and readonly == "0"
                    and not tail.strip().strip(b";").strip()
                ):
                    level = {"output_format_compression_level": str(zlib_level)}
                    for name, saved in self._apply_settings(conn, session, level).items():
                        restore.setdefault(
                            name, saved
                        )  # a request's own value is not the session's
                    chunks = self._engine_gzip(conn, head[: statement.output_format_at], fmt, bound)
                    out.precompressed = True
                else:
                    chunks = self._result(conn, head, fmt, bound)
                chunks = self._with_faults(head, chunks)
            else:
                data = self._run(conn, head, fmt, bound).bytes()
                chunks = iter([data] if data else [])
            self._send_result(h, entry, chunks, hold, headers, out, tag, finish)
        finally:
            finish()

    def _result(self, conn: Any, sql: bytes, fmt: str, bound: dict[str, str]) -> Iterator[bytes]:
        try:
            if fmt not in STREAMED_FORMATS:
                raise ValueError("Streaming query is not supported for this format")
            result = conn.send_query(sql, fmt, params=bound)
        except Exception as exc:
            if "Streaming query is not supported" not in str(exc):
                raise self.engine_error(exc) from None
            data = self._run(conn, sql, fmt, bound).bytes()
            return iter([data] if data else [])

        def chunks() -> Iterator[bytes]:
            try:
                for chunk in result:
                    data = chunk.bytes()
                    if data:
                        yield data
            except Exception as exc:
                raise self.engine_error(exc) from None
            finally:
                result.close()

        return chunks()

    def _zlib_settings(self, conn: Any) -> tuple[int, str]:
        """The request's gzip level and readonly, as the engine has them now (request
        settings, the session's, or the defaults)."""
        level, readonly = (
            self._run(conn, "SELECT getSetting('http_zlib_compression_level'), "
                      "getSetting('readonly')", "TSV").bytes().decode().split()
        )  # fmt: skip
        return int(level), readonly

    def _engine_gzip(
        self, conn: Any, sql: bytes, fmt: str, bound: dict[str, str]
    ) -> Iterator[bytes]:
        """A SELECT's result gzip-compressed by the engine, as a server compresses its
        HTTP response (in the engine, zlib-ng), not by Python's zlib.

        The engine writes the result into a FIFO (``INSERT INTO FUNCTION file(…,
        'gzip')``) from a thread; the handler reads it as it comes. Nothing starts
        before the first chunk is asked for. The FIFO is opened for reading first,
        without blocking, so that a query failing before the engine opens it can still
        end the read: the thread then opens and closes it itself."""
        fifo = os.path.join(self._fifos, f"{uuid.uuid4().hex}.gz")
        os.mkfifo(fifo, 0o600)
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        insert = (
            f"INSERT INTO FUNCTION file({sql_literal(fifo)}, {sql_literal(fmt)}, 'auto', 'gzip') "
        ).encode() + sql
        failure: list[Exception] = []

        def write() -> None:
            try:
                conn.query(insert, "TSV", params=bound)
            except Exception as exc:
                failure.append(exc)
            finally:  # the reader holds the FIFO open, so this never blocks
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

        writer = threading.Thread(target=write, daemon=True)
        pipe = None
        try:
            writer.start()
            # Until a writer comes, a read would say end of file: wait for it.
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while not poller.poll(1000):
                pass
            os.set_blocking(fd, True)
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, BLOCK)  # the engine's writes, whole
            pipe = open(fd, "rb", buffering=BLOCK, closefd=False)
            while data := pipe.read(BLOCK):
                yield data
            writer.join()
            if failure:
                raise self.engine_error(failure[0]) from None
        finally:
            if writer.is_alive():  # the client went away: let the engine finish
                os.set_blocking(fd, True)
                while os.read(fd, BLOCK):
                    pass
                writer.join()
            if pipe is not None:
                pipe.close()
            os.close(fd)
            os.unlink(fifo)

    def _send_result(
        self, h: Any, entry: RequestLog, chunks: Iterator[bytes], hold: float,
        headers: dict[str, str], output: Output, tag: str, finish: Callable[[], None],
    ) -> None:  # fmt: skip
        """Hold the first ``hold`` bytes (an error there gets its status), then stream;
        ``finish()`` once the engine is done, before the response's end."""
        held = tempfile.SpooledTemporaryFile(max_size=16 << 20)
        try:
            size, rest = 0, chunks
            for data in chunks:
                held.write(data)
                size += len(data)
                if size >= hold:
                    break
            else:
                rest = iter(())
            entry.held_bytes = size
            entry.status, entry.chunked, entry.content_encoding = 200, True, output.method
            h.send_response(200)
            for name, value in headers.items():
                h.send_header(name, value)
            summary = {
                "read_rows": "0",
                "read_bytes": "0",
                "written_rows": "0",
                "written_bytes": "0",
            }
            h.send_header("X-ClickHouse-Summary", json.dumps(summary))
            h.send_header("Transfer-Encoding", "chunked")
            if output.method:
                h.send_header("Content-Encoding", output.method)
            h.end_headers()
            out = Chunked(h.wfile, entry, output)
            held.seek(0)
            while data := held.read(BLOCK):
                out.write(data)
            held.close()
            complete = True
            try:
                for data in rest:
                    out.write(data)
            except ServerError as exc:
                text, mark = exc.text.encode(), tag.encode()
                if self.exception_tag:
                    # After the headers: the server's tagged exception block, then a cut stream.
                    out.write_apart(
                        b"__exception__\r\n%s\r\n%s\n%d %s\r\n__exception__\r\n"
                        % (mark, text, len(text) + 1, mark)
                    )
                    complete = False
                else:  # before 25.11: the text as data, and the stream ends as if whole
                    out.write_apart(text + b"\n")
            _close(chunks)
            finish()
            out.end(complete=complete)
            if not complete:
                entry.broken = h.close_connection = True
        finally:
            held.close()
            _close(chunks)

    def _insert(
        self, h: Any, entry: RequestLog, conn: Any, statement: Statement, head: bytes,
        stream: Decoded, base: dict[str, str],
    ) -> None:  # fmt: skip
        try:
            inserter = conn.send_insert(statement.insert_sql.decode(), statement.insert_format)
        except Exception as exc:
            raise self.engine_error(exc) from None
        try:
            data = head[statement.data_start :]
            while True:
                if data:
                    inserter.append(data)
                data = stream.read(BLOCK)
                if not data:
                    break
            result = inserter.finish()
        except ServerError:
            inserter.cancel()
            raise
        except (ConnectionError, OSError):
            inserter.cancel()
            raise
        except Exception as exc:
            inserter.cancel()
            raise self.engine_error(exc) from None
        summary = {
            "read_rows": str(result.rows_written),
            "read_bytes": str(result.bytes_written),
            "written_rows": str(result.rows_written),
            "written_bytes": str(result.bytes_written),
            "elapsed_ns": str(int(result.elapsed * 1e9)),
        }
        self._reply(h, entry, 200, dict(base, **{"X-ClickHouse-Summary": json.dumps(summary)}), b"")


def serve(path: str) -> None:
    """Serve ``path`` until terminated or orphaned: the endpoint as a process of its own.

    This is how the tests reach ClickHouse 24.8, the release OONI's cluster runs
    (ooni/devops ``ansible/group_vars/clickhouse/vars.yml``: 24.8.6.70): chdb 3.3.0
    embeds 24.8.4 and cannot share a process with the project's chdb, so the endpoint
    runs under the interpreter of a virtual environment holding it (``make
    .venv-ch24``). The users and passwords come as JSON in ``CHDB_HTTP_USERS``, never
    on the command line; the first line written is ``<port> <version>``. Standard
    input must not be a pipe: the engine reads an INSERT's data from it when it is."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: every thread's stack
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    parent = os.getppid()
    users = json.loads(os.environ.get("CHDB_HTTP_USERS", '{"default": ""}'))
    endpoint = ClickHouseHTTP(path, users)
    endpoint.keep_engine()
    print(endpoint.port, endpoint.version, flush=True)
    try:
        while not stop.wait(1.0) and os.getppid() == parent:
            pass
    finally:
        endpoint.close()


if __name__ == "__main__":
    serve(sys.argv[1])
