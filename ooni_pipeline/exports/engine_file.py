"""An export object written by ClickHouse itself, whole, in its final format.

Every export (the website-metrics CSV, the Parquet copies) is one query whose result
is the object: the engine formats and compresses it, far faster than Python would.
Embedded, the engine writes the file (``INSERT INTO FUNCTION file``); from a server
the result arrives over HTTP already in its final bytes (gzip by the server's HTTP
compression) and is stored as it comes. Either way the bytes land in the store's
staged file (``ObjectStore.open_file_writer``), which the caller may read back
before it becomes the object; an error leaves the object as it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline.object_store.stores import ObjectStore

_PATH_PARAMETER = "_engine_file_path"


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
) -> Iterator[Path]:
    """The result of ``select_sql`` (no SETTINGS clause of its own; put them in
    ``settings``, comma-separated) in format ``fmt``, gzip-compressed at
    ``gzip_level`` when given, as a staged file that becomes object ``key`` when the
    block ends without error."""
    if gzip_level is not None and not 1 <= int(gzip_level) <= 9:
        raise ValueError(f"gzip level must be 1..9, got {gzip_level!r}")
    if _PATH_PARAMETER in params:
        raise ValueError(f"{_PATH_PARAMETER} is reserved")
    with store.open_file_writer(key) as path:
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
        else:
            sql = f"{select_sql} SETTINGS {settings}" if settings else select_sql
            chunks = (
                ch.stream_gzip(sql, params, fmt=fmt, level=int(gzip_level))
                if gzip_level is not None
                else ch.stream(sql, params, fmt=fmt)
            )
            with open(path, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
        yield path


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, bytes) of a staged file: what the manifest and checks record."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256")
    return digest.hexdigest(), path.stat().st_size
