"""An export object written by ClickHouse itself, whole, in its final format.

Every export (the website-metrics CSV, the Parquet copies) is one query whose result
is the object: the engine formats and compresses it, far faster than Python would.
Embedded, the engine writes the file (``INSERT INTO FUNCTION file``); from a server
the result arrives over HTTP already in its final bytes (gzip by the server's HTTP
compression) and is stored as it comes. Either way the bytes land in the store's
staged file (``ObjectStore.open_file_writer``), which the caller may read before it
becomes the object; an error leaves the object as it was.

A ``reader`` reads the file *while* it is written: the engine writes from a thread
and the reader follows the growing file, so checking the object costs the spare core
(the engine formats and compresses on one), not a second pass after the write.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar

from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline.object_store.stores import ObjectStore

_PATH_PARAMETER = "_engine_file_path"
_WAIT_FOR_WRITER_S = 0.005
T = TypeVar("T")


@dataclass
class StagedFile(Generic[T]):
    """The staged file, and what ``reader`` returned having read it whole."""

    path: Path
    read: T | None = None


@contextmanager
def engine_file(
    ch: ClickHouse,
    store: ObjectStore,
    key: str,
    select_sql: str,
    params: dict[str, Any],
    *,
    fmt: str,
    settings: str = "",
    gzip_level: int | None = None,
    reader: Callable[[BinaryIO], T] | None = None,
) -> Iterator[StagedFile[T]]:
    """The result of ``select_sql`` (no SETTINGS clause of its own; put them in
    ``settings``, comma-separated) in format ``fmt``, gzip-compressed at
    ``gzip_level`` when given, as a staged file that becomes object ``key`` when the
    block ends without error.

    ``reader``, if given, is called with the file as it is being written (reads wait
    for the writer and end where the finished file ends); its result is
    ``StagedFile.read``. The writer's error, if any, is raised in preference to the
    reader's (a reader failing on a cut file is a consequence)."""
    if gzip_level is not None and not 1 <= int(gzip_level) <= 9:
        raise ValueError(f"gzip level must be 1..9, got {gzip_level!r}")
    if _PATH_PARAMETER in params:
        raise ValueError(f"{_PATH_PARAMETER} is reserved")
    with store.open_file_writer(key) as path:

        def write() -> None:
            _write(ch, path, select_sql, params, fmt, settings, gzip_level)

        if reader is None:
            write()
            yield StagedFile(path)
        else:
            yield StagedFile(path, _read_while_written(write, path, reader))


def _write(
    ch: ClickHouse,
    path: Path,
    select_sql: str,
    params: dict[str, Any],
    fmt: str,
    settings: str,
    gzip_level: int | None,
) -> None:
    if ch.embedded:
        codec = "gzip" if gzip_level is not None else "none"
        options = ["engine_file_truncate_on_insert = 1"]
        if gzip_level is not None:
            options.append(f"output_format_compression_level = {int(gzip_level)}")
        if settings:
            options.append(settings)
        ch.command(
            f"INSERT INTO FUNCTION file({{{_PATH_PARAMETER}:String}}, '{fmt}', 'auto', "
            f"'{codec}') {select_sql} SETTINGS {', '.join(options)}",
            params | {_PATH_PARAMETER: str(path)},
        )
        return
    sql = f"{select_sql} SETTINGS {settings}" if settings else select_sql
    chunks = (
        ch.stream_gzip(sql, params, fmt=fmt, level=int(gzip_level))
        if gzip_level is not None
        else ch.stream(sql, params, fmt=fmt)
    )
    with open(path, "wb") as handle:  # truncated in place: a reader may have it open
        for chunk in chunks:
            handle.write(chunk)


def _read_while_written(
    write: Callable[[], None], path: Path, reader: Callable[[BinaryIO], T]
) -> T:
    """``reader``'s result on the file ``write`` (run in a thread) writes; the
    writer's failure first."""
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            write()
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=run, name=f"engine_file {path.name}", daemon=True)
    with open(path, "rb", buffering=0) as handle:
        writer.start()
        try:
            result = reader(io.BufferedReader(_GrowingFile(handle, done), 1 << 20))
        finally:
            writer.join()
            if failure:
                raise failure[0]
    return result


class _GrowingFile(io.RawIOBase):
    """A file another thread is writing: a read past its current end waits for more,
    and the end of file is the end of the finished file."""

    def __init__(self, handle: BinaryIO, done: threading.Event):
        self._handle, self._done = handle, done

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            finished = self._done.is_set()  # before the read: nothing is written after it
            count = self._handle.readinto(buffer)
            if count or finished:
                return count
            self._done.wait(_WAIT_FOR_WRITER_S)


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, bytes) of a staged file: what the manifest and checks record."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256")
    return digest.hexdigest(), path.stat().st_size
