"""One chunk exported: ClickHouse's CSV, compressed into the object as it comes.

The engine writes the CSV itself (its fastest writer, one thread) while Python
compresses on the other core. The lines that pass are counted (``bytes.count``,
about 1% of the export) and must be as many as the fingerprint said the rows make
(``plan.fingerprint``: a line per row plus the line breaks inside fields): a block
lost or repeated on the way from the engine fails the export before the manifest
records the object, and before the upload completes: the previous object stays as
it was. zstd writes its content checksum into the object, which every
reader (ClickHouse, ``zstd -d``) verifies as it unpacks; the restore check then has
the engine count the object's lines and bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from ooni_pipeline.backup.plan import Chunk, Source
from ooni_pipeline.clickhouse import ClickHouse, ClickHouseError, quote_identifier
from ooni_pipeline.clickhouse.connection import StreamTail
from ooni_pipeline.object_store import UploadResult, stream_upload
from ooni_pipeline.object_store.stores import ObjectStore

MB = 1024 * 1024


def csv_header(columns: list[str]) -> bytes:
    """A CSVWithNames header line, quoted as ClickHouse writes it."""
    return (",".join('"' + c.replace('"', '""') + '"' for c in columns) + "\n").encode()


def export_chunk(
    ch: ClickHouse,
    store: ObjectStore,
    chunk: Chunk,
    source: Source,
    max_threads: int,
    verify: Callable[[int], None],
    progress: Callable[[int, int], None] | None = None,
) -> UploadResult:
    """Write the chunk's object (CSVWithNames, zstd with its content checksum).

    ``verify(lines)`` gets the lines sent, header included, once all are written and
    before the object replaces the previous one: raising there aborts the upload, so a
    chunk that fails its checks never replaces the last good backup."""
    rows, params = source.rows(chunk)
    sql = f"SELECT * FROM {rows} SETTINGS max_threads = {int(max_threads)}"
    # Asked with each chunk, not kept from the run's start: a column added meanwhile
    # is in SELECT *'s rows, so it must be in their header too.
    header = csv_header(ch.header(f"SELECT * FROM {quote_identifier(chunk.spec.table)}"))
    lines, tail = 0, StreamTail()

    def body() -> Iterator[bytes]:
        nonlocal lines
        lines += header.count(b"\n")
        yield header
        for block in ch.stream(sql, params, fmt="CSV"):
            lines += block.count(b"\n")
            tail.add(block)
            yield block

    def before_commit() -> None:
        if tail.ends_with_server_error():
            raise ClickHouseError(
                f"{chunk.label}: the server's answer ended with an error text (a server "
                "before 25.11 failing mid-query); not uploaded, the previous object is kept"
            )
        verify(lines)

    return stream_upload(
        store, chunk.key, body(), "zstd", progress=progress, before_commit=before_commit
    )


def progress_logger(label: str, log) -> Callable[[int, int], None]:
    """Logs the bytes read and written every 10 s of a long export."""
    start = last = time.monotonic()

    def progress(raw: int, written: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 10:
            last = now
            log.info(
                f"{label}: {raw / MB:.0f} MB read, {written / MB:.0f} MB written, "
                f"{raw / MB / (now - start):.1f} MB/s"
            )

    return progress
