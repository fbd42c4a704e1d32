"""Streaming compressed upload: the one way exports and backups write objects.

Chunks (e.g. CSV straight out of ClickHouse) are compressed as they arrive and
written to an all-or-nothing object writer: no temporary file, memory bounded by
the compressor's window plus the writer's few parts.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import zstandard

from ooni_pipeline.object_store.stores import ObjectStore

Compression = Literal["gzip", "zstd", "none"]


@dataclass(frozen=True)
class UploadResult:
    key: str
    address: str
    raw_bytes: int
    bytes: int
    sha256: str
    duration_s: float
    etag: str | None = None  # the store's tag of the object (S3's ETag), if it keeps one


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def _compressor(compression: Compression, level: int | None):
    if compression == "gzip":
        return zlib.compressobj(
            6 if level is None else level, zlib.DEFLATED, 31
        )  # wbits 31: gzip container
    if compression == "zstd":
        # With the content checksum, whoever unpacks the object (ClickHouse, zstd -d)
        # verifies every byte of it; it costs 4 bytes and next to no time.
        return zstandard.ZstdCompressor(
            level=3 if level is None else level, write_checksum=True
        ).compressobj()
    if compression == "none":
        return _Identity()
    raise ValueError(f"unknown compression {compression!r}")


def stream_upload(
    store: ObjectStore,
    key: str,
    chunks: Iterable[bytes],
    compression: Compression,
    progress: Callable[[int, int], None] | None = None,
    level: int | None = None,
    before_commit: Callable[[], None] | None = None,
) -> UploadResult:
    """Compress ``chunks`` into the object ``key``; nothing appears there on failure.

    ``progress(raw_bytes, compressed_bytes)`` is called after each chunk; ``level``
    overrides the codec's default compression level (gzip 6, zstd 3).
    ``before_commit()`` runs once every byte is written but before the object
    replaces what is under ``key`` (the multipart upload completed, the file renamed):
    the checks that can be made from the stream (lines counted against the source)
    raise there, and the upload is aborted, leaving the previous object as it was.
    """
    start = time.monotonic()
    compressor = _compressor(compression, level)
    digest = hashlib.sha256()
    raw = written = 0
    with store.open_writer(key) as writer:
        for chunk in chunks:
            raw += len(chunk)
            out = compressor.compress(chunk)
            if out:
                digest.update(out)
                written += len(out)
                writer.write(out)
            if progress is not None:
                progress(raw, written)
        out = compressor.flush()
        digest.update(out)
        written += len(out)
        writer.write(out)
        if before_commit is not None:
            before_commit()
    return UploadResult(
        key=key,
        address=store.address(key),
        raw_bytes=raw,
        bytes=written,
        sha256=digest.hexdigest(),
        duration_s=time.monotonic() - start,
        etag=writer.etag,
    )
