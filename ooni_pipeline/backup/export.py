"""One chunk exported: the engine's CSV lines, compressed into the object as they come,
with the checksums that let the restore check verify the object cheaply.

The export query has the engine format each row as its CSV line (``formatRow``, the
CSV writer itself) and, in the same pass, hash it twice:

- ``row_hash``, the typed row's ``cityHash64``: summed over the chunk it is the
  fingerprint (``plan.fingerprint``), so the rows that reached the object are proved
  to be exactly the rows fingerprinted, whatever happened between the engine and the
  upload and however the table changed meanwhile: no second scan of the table;
- ``line_hash``, the line's text as ``LineAsString`` reads it back (split at the
  newlines a string field may hold): summed with the header's, it is what the engine
  finds when it reads the object as lines. The restore check compares the two:
  counting and hashing lines costs a tenth of parsing CSV back into types, and it
  proves the object holds, line for line, the engine's own CSV of the fingerprinted
  rows (which the engine parses back by construction; older objects are re-parsed
  into the table's types in rotation, see ``verify``).

The lines travel as Arrow batches: a batch's lines are one contiguous buffer, handed
to the compressor without a copy or a per-row step in Python.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ooni_pipeline.backup.plan import Chunk, Source
from ooni_pipeline.clickhouse import ClickHouse, quote_identifier
from ooni_pipeline.clickhouse.arrow_stream import ARROW_UNCOMPRESSED, binary_values, record_batches
from ooni_pipeline.object_store import UploadResult, stream_upload
from ooni_pipeline.object_store.stores import ObjectStore

if TYPE_CHECKING:
    import pyarrow as pa

MB = 1024 * 1024
_MASK = (1 << 64) - 1


def line_pieces(text_sql: str) -> str:
    """SQL for (number of lines, sum of their ``cityHash64``) of CSV text ending in a
    newline, split as ``LineAsString`` reads it: at every newline, none after the last."""
    return (
        f"length(arrayPopBack(splitByChar('\\n', {text_sql})) AS pieces), "
        "arraySum(arrayMap(piece -> cityHash64(piece), pieces))"
    )


def export_sql(chunk: Chunk, source: Source, max_threads: int) -> tuple[str, dict[str, Any]]:
    """The chunk's rows as (line, row_hash, line_count, line_hash), in Arrow batches."""
    rows, params = source.rows(chunk)
    sql = (
        f"SELECT line, row_hash, {line_pieces('line')} "
        f"FROM (SELECT formatRow('CSV', *) AS line, cityHash64(*) AS row_hash FROM {rows}) "
        f"SETTINGS max_threads = {int(max_threads)}, {ARROW_UNCOMPRESSED}"
    )
    return sql, params


def csv_header(columns: list[str]) -> bytes:
    """A CSVWithNames header line, quoted as ClickHouse writes it."""
    return (",".join('"' + c.replace('"', '""') + '"' for c in columns) + "\n").encode()


@dataclass
class ExportTally:
    """What the engine said it sent: rows and their fingerprint, lines and theirs."""

    rows: int = 0
    row_sum: int = 0
    lines: int = 0
    line_sum: int = 0

    def add(self, batch: pa.RecordBatch) -> memoryview:
        """Count a batch in; returns its lines, end to end."""
        import pyarrow.compute as pc

        self.rows += batch.num_rows
        self.row_sum = (self.row_sum + (pc.sum(batch.column(1)).as_py() or 0)) & _MASK
        self.lines += pc.sum(batch.column(2)).as_py() or 0
        self.line_sum = (self.line_sum + (pc.sum(batch.column(3)).as_py() or 0)) & _MASK
        return binary_values(batch.column(0))

    @property
    def fingerprint(self) -> str:
        """As ``plan.fingerprint`` writes it."""
        return f"{self.rows}:{self.row_sum:016x}"

    @property
    def lines_fingerprint(self) -> str:
        return f"{self.lines}:{self.line_sum:016x}"


def export_chunk(
    ch: ClickHouse,
    store: ObjectStore,
    chunk: Chunk,
    source: Source,
    max_threads: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[UploadResult, ExportTally]:
    """Write the chunk's object (CSVWithNames, zstd); returns the upload and the tally
    (header included in its lines)."""
    header = csv_header(ch.header(f"SELECT * FROM {quote_identifier(chunk.spec.table)}"))
    lines, line_sum = ch.query_rows(
        f"SELECT {line_pieces('{header:String}')}", {"header": header.decode()}
    )[0]
    tally = ExportTally(lines=int(lines), line_sum=int(line_sum))
    sql, params = export_sql(chunk, source, max_threads)

    def body() -> Iterator[bytes | memoryview]:
        yield header
        for batch in record_batches(ch.stream(sql, params, fmt="ArrowStream")):
            yield tally.add(batch)

    return stream_upload(store, chunk.key, body(), "zstd", progress=progress), tally


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
