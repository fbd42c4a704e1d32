"""Fetching with retries and conditional GET, against the local upstream server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ooni_pipeline.decompression import DecompressionLimitExceeded
from ooni_pipeline.fetch import FetchError, fetch, fetch_bytes, http_session
from ooni_pipeline_tests.rig import Reply, UpstreamServer, bomb

MiB = 1 << 20


def test_retries_5xx_then_succeeds(upstream: UpstreamServer) -> None:
    url = upstream.put("f.csv", "a,b\n")
    upstream.fail("f.csv", Reply(500), Reply(503))
    body, validators = fetch_bytes(url)
    assert body == b"a,b\n"
    assert upstream.hits("f.csv") == [500, 503, 200]
    assert validators.etag


def test_404_is_final_and_named(upstream: UpstreamServer) -> None:
    with pytest.raises(FetchError, match=r"missing\.csv.*HTTP 404"):
        fetch_bytes(upstream.url("missing.csv"))
    assert upstream.hits("missing.csv") == [404]
    with pytest.raises(FetchError) as info:
        fetch_bytes(upstream.url("missing.csv"))
    assert info.value.status == 404


def test_an_upstream_reason_phrase_is_shown_as_a_short_excerpt(upstream: UpstreamServer) -> None:
    """The status line's reason phrase is the upstream's text: an error shows at most
    an escaped excerpt of it, never the whole."""
    reason = "Forbidden " + "A" * 300 + " token=SECRET-MARKER"
    url = upstream.put("r.csv", "a\n")
    upstream.fail("r.csv", Reply(403, reason=reason))
    with pytest.raises(FetchError) as info:
        fetch_bytes(url)
    message = str(info.value)
    assert "HTTP 403 'Forbidden AAAA" in message and "more characters" in message
    assert "SECRET-MARKER" not in message and len(message) < len(url) + 120


def test_truncated_body_is_an_error(upstream: UpstreamServer) -> None:
    url = upstream.put("t.csv", "x" * 10_000)
    upstream.fail("t.csv", Reply(200, b"x" * 10_000, truncate_to=5_000))
    with pytest.raises(FetchError, match="truncated"):
        fetch_bytes(url)


def test_conditional_get(upstream: UpstreamServer) -> None:
    url = upstream.put("c.csv", "v1")
    body, validators = fetch_bytes(url)
    assert body == b"v1"
    body, again = fetch_bytes(url, previous=validators)
    assert body is None and again == validators
    upstream.put("c.csv", "v2")
    body, newer = fetch_bytes(url, previous=validators)
    assert body == b"v2" and newer.etag != validators.etag


def test_validators_are_sent_only_to_their_url(upstream: UpstreamServer) -> None:
    """A mirror without ETags whose file is older than the last fetch elsewhere
    still answers 200: the old URL's Last-Modified is not sent to it."""
    first = upstream.put("a/f.csv", "v1", last_modified=datetime(2026, 11, 10, tzinfo=UTC))
    _, validators = fetch_bytes(first)
    assert validators.url == first and validators.last_modified
    mirror = upstream.put(
        "b/f.csv", "v0", last_modified=datetime(2026, 11, 1, tzinfo=UTC), etag=False
    )
    body, fetched = fetch_bytes(mirror, previous=validators)
    assert body == b"v0" and fetched.url == mirror
    sent = upstream.log[-1][2]
    assert "If-Modified-Since" not in sent and "If-None-Match" not in sent
    # the mirror's own validators do make the next fetch of the mirror conditional
    assert fetch_bytes(mirror, previous=fetched)[0] is None
    assert upstream.hits("b/f.csv") == [200, 304]


def test_slow_response_times_out(upstream: UpstreamServer) -> None:
    url = upstream.put("slow", "late")
    upstream.fail("slow", *[Reply(200, b"late", delay_s=2.0)] * 2)
    with pytest.raises(FetchError, match="slow"):
        with fetch(url, session=http_session(retries=1, backoff_s=0), timeout=(1, 0.5)):
            pass


def test_a_content_encoding_bomb_is_read_in_bounded_chunks_up_to_the_cap(
    upstream: UpstreamServer,
) -> None:
    # 64 KB on the wire, 64 MiB once requests has undone the Content-Encoding.
    body = bomb("gzip", 64 * MiB)
    url = upstream.url("bomb.csv")
    upstream.fail("bomb.csv", Reply(200, body, {"Content-Encoding": "gzip"}))
    sizes: list[int] = []
    with pytest.raises(DecompressionLimitExceeded) as info:
        with fetch(url, max_bytes=4 * MiB) as fetched:
            for chunk in fetched.iter_bytes():
                sizes.append(len(chunk))
    message = str(info.value)
    assert "bomb.csv" in message and "more than 4194304 bytes" in message
    assert "\\x00" not in message and len(message) < 300  # named, never quoted
    assert sum(sizes) <= 4 * MiB and max(sizes) <= MiB


def test_fetch_bytes_stops_a_bomb_at_its_cap(upstream: UpstreamServer) -> None:
    url = upstream.url("fp.csv")
    upstream.fail("fp.csv", Reply(200, bomb("gzip", 8 * MiB), {"Content-Encoding": "gzip"}))
    with pytest.raises(DecompressionLimitExceeded, match="fp.csv unpacks to more than 1048576"):
        fetch_bytes(url, max_bytes=MiB)
