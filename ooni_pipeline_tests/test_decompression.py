"""Bounded decompression, the mechanism every reader of untrusted compressed data uses."""

from __future__ import annotations

import gzip
import io

import pytest
import zstandard

from ooni_pipeline.decompression import DecompressionLimitExceeded, iter_bounded, open_bounded
from ooni_pipeline_tests.rig import bomb

MiB = 1 << 20
DATA = b"".join(b"%d,measurement,%d\n" % (n, n * n) for n in range(50_000))
PACKED = {"gzip": gzip.compress(DATA), "zstd": zstandard.ZstdCompressor().compress(DATA)}


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_exactly_the_limit_passes_one_byte_more_fails(codec: str) -> None:
    body = PACKED[codec]
    assert b"".join(iter_bounded(io.BytesIO(body), codec, limit=len(DATA), what="x")) == DATA
    with pytest.raises(DecompressionLimitExceeded, match="x unpacks to more than"):
        b"".join(iter_bounded(io.BytesIO(body), codec, limit=len(DATA) - 1, what="x"))


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_a_bomb_is_never_handed_on_past_the_cap(codec: str) -> None:
    seen = 0
    with pytest.raises(DecompressionLimitExceeded) as info:
        for chunk in iter_bounded(
            [bomb(codec, 256 * MiB)], codec, limit=3 * MiB + 5, what="bomb.bin", hint="raise X"
        ):
            assert len(chunk) <= MiB
            seen += len(chunk)
    assert seen <= 3 * MiB + 5
    assert str(info.value).startswith("bomb.bin unpacks to more than 3145733 bytes (3.0 MiB)")
    assert str(info.value).endswith("; raise X")


def test_concatenated_gzip_members_are_read_whole_as_gzip_does() -> None:
    body = gzip.compress(DATA[:1000]) + gzip.compress(DATA[1000:])
    with open_bounded(io.BytesIO(body), "gzip", limit=len(DATA), what="x") as reader:
        assert reader.read() == DATA


def test_a_truncated_gzip_stream_is_an_eof_error() -> None:
    with pytest.raises(EOFError):
        b"".join(iter_bounded([PACKED["gzip"][:-100]], "gzip", limit=len(DATA), what="x"))
