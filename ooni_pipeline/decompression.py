"""Bounded decompression: the one way the project unpacks data it did not write itself.

A few megabytes of gzip or zstd can unpack to gigabytes (a run of zeros compresses
about 1000:1), so nothing that comes from upstream or from the object store is
inflated without a cap on what comes out. Reading goes through the codecs' own
bounded readers (``gzip.GzipFile.read(n)`` inflates with zlib's ``max_length``,
``zstandard``'s stream reader fills at most ``n`` bytes), so memory stays at one
chunk whatever the ratio, and it stops with ``DecompressionLimitExceeded`` as soon
as the output would pass the cap: never more than ``limit`` bytes are handed on.
HTTP bodies are counted the same way after urllib3 (>= 2.7) has undone their
``Content-Encoding`` in bounded steps.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterable, Iterator
from typing import BinaryIO, Literal

import zstandard

Codec = Literal["gzip", "zstd"]
CHUNK_BYTES = 1 << 20
GiB = 1 << 30


class DecompressionLimitExceeded(RuntimeError):
    """``what`` unpacks to more than ``limit`` bytes; reading stopped at the limit.

    The message names the data and the cap, never its content.
    """

    def __init__(self, what: str, limit: int, hint: str = ""):
        self.what, self.limit = what, limit
        super().__init__(
            f"{what} unpacks to more than {limit} bytes ({_human(limit)}): reading stopped "
            f"at that limit (a decompression bomb, or not the expected data)"
            + (f"; {hint}" if hint else "")
        )


def _human(size: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


class _Budget:
    """Counts bytes handed on and raises once they pass the limit."""

    def __init__(self, limit: int, what: str, hint: str):
        if limit < 0:
            raise ValueError(f"the limit for {what} must not be negative, got {limit}")
        self.limit, self.what, self.hint = limit, what, hint
        self.used = 0

    def room(self) -> int:
        """How many bytes to ask for: one past the limit, to tell 'exactly at' from 'over'."""
        return self.limit - self.used + 1

    def spend(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise DecompressionLimitExceeded(self.what, self.limit, self.hint)


class _ChunksReader(io.RawIOBase):
    """A readable view of an iterable of byte chunks (an HTTP body being streamed)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


class _LimitedReader(io.RawIOBase):
    """Reads a decompressing stream in pieces no larger than what is left of the budget."""

    def __init__(self, inner: BinaryIO, budget: _Budget):
        self._inner = inner
        self._budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._inner.read(min(len(buffer), self._budget.room()))
        self._budget.spend(len(data))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()


def open_bounded(
    source: BinaryIO | Iterable[bytes],
    codec: Codec,
    *,
    limit: int,
    what: str,
    hint: str = "",
) -> io.BufferedReader:
    """A binary reader of ``source`` decompressed with ``codec`` that raises
    ``DecompressionLimitExceeded`` once more than ``limit`` bytes come out.

    ``source`` is a readable (an S3 body, a file) or an iterable of chunks; it is not
    closed. ``what`` names the data in the error (e.g. the object key); ``hint`` says
    how to raise the cap. Corrupt input raises the codec's own errors
    (``gzip.BadGzipFile``, ``zlib.error``, ``EOFError`` when truncated, ``zstandard.ZstdError``).
    """
    raw = source if hasattr(source, "read") else _ChunksReader(source)
    inner: BinaryIO
    if codec == "gzip":
        inner = gzip.GzipFile(fileobj=raw, mode="rb")
    elif codec == "zstd":
        inner = zstandard.ZstdDecompressor().stream_reader(raw, closefd=False)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return io.BufferedReader(_LimitedReader(inner, _Budget(limit, what, hint)), CHUNK_BYTES)


def iter_bounded(
    source: BinaryIO | Iterable[bytes],
    codec: Codec,
    *,
    limit: int,
    what: str,
    hint: str = "",
    chunk_size: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """``open_bounded`` as chunks of at most ``chunk_size`` bytes."""
    with open_bounded(source, codec, limit=limit, what=what, hint=hint) as reader:
        yield from iter(lambda: reader.read(chunk_size), b"")


def limit_chunks(
    chunks: Iterable[bytes], *, limit: int, what: str, hint: str = ""
) -> Iterator[bytes]:
    """Pass ``chunks`` on, raising ``DecompressionLimitExceeded`` before the one that
    takes the total past ``limit`` (for bodies a library already decoded chunk by chunk)."""
    budget = _Budget(limit, what, hint)
    for chunk in chunks:
        budget.spend(len(chunk))
        yield chunk
