"""Record batches out of a ClickHouse ``ArrowStream`` result, as it streams.

A server sends one Arrow IPC stream; embedded ClickHouse (chdb) sends one per block,
each with its own schema and end marker. Both arrive as byte chunks
(``ClickHouse.stream(..., fmt="ArrowStream")``) cut anywhere; this reads them as
consecutive IPC streams, one batch at a time, so memory stays at one block.

Ask for ``output_format_arrow_compression_method = 'none'``: ClickHouse compresses
Arrow bodies with LZ4 by default, which costs a compression and a decompression for
data that stays on this machine (or travels zstd-compressed over HTTP anyway).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ooni_pipeline.decompression import ChunksReader

if TYPE_CHECKING:
    import pyarrow as pa

ARROW_UNCOMPRESSED = "output_format_arrow_compression_method = 'none'"


def record_batches(chunks: Iterable[bytes]) -> Iterator[pa.RecordBatch]:
    """The batches of one or more concatenated Arrow IPC streams."""
    import pyarrow as pa

    source = io.BufferedReader(ChunksReader(chunks), 1 << 20)
    while source.peek(1):
        yield from pa.ipc.open_stream(source)


def binary_values(column: pa.Array) -> memoryview:
    """The bytes of a binary or string column's values, end to end, without a copy
    (a batch's slice of the values buffer between its first and last offset)."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_large_binary(kind) or pa.types.is_large_string(kind):
        offset_format = "q"
    elif pa.types.is_binary(kind) or pa.types.is_string(kind):
        offset_format = "i"
    else:
        raise TypeError(f"not a binary column: {kind}")
    if column.null_count:
        raise ValueError("the column has nulls")
    _, offsets, values = column.buffers()
    if not len(column):
        return memoryview(b"")
    bounds = memoryview(offsets).cast(offset_format)
    first, last = bounds[column.offset], bounds[column.offset + len(column)]
    return memoryview(values)[first:last] if values is not None else memoryview(b"")
