"""Fetching upstream files over HTTP(S): the one place for timeouts, retries and conditional GET.

Retries (with exponential backoff) cover connection errors and 5xx answers; a 4xx
is final and reported with the URL. A conditional GET sends the validators of the
last successful fetch (ETag, Last-Modified) so an unchanged file costs one 304; the
validators belong to the URL that gave them and are sent to no other (a mirror's
older file must not pass as "not modified" without being validated).
Bodies are read with a cap on their decoded size: requests undoes a
``Content-Encoding: gzip`` transparently, so a small response can unpack to gigabytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ooni_pipeline.decompression import GiB, limit_chunks
from ooni_pipeline.untrusted import excerpt

# requests is imported where a fetch happens: the code location loads without it (a
# tenth of a second of every run's start).
if TYPE_CHECKING:
    import requests

USER_AGENT = "ooni-pipeline/0.1 (+https://github.com/ooni)"
CONNECT_TIMEOUT_S = 15
READ_TIMEOUT_S = 120
# Decoded bytes a body may have unless the caller says otherwise; OONI's largest
# source (the AS-organisation map) is tens of MB.
DEFAULT_MAX_BODY_BYTES = GiB


class FetchError(RuntimeError):
    """The source could not be fetched; the message names the URL and why.

    ``status`` is the final HTTP status when the server answered (404: not published).
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Validators:
    """What identifies a version of the remote file at ``url`` (for conditional GET
    and metadata)."""

    etag: str | None = None
    last_modified: str | None = None
    url: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers

    def describe(self) -> str:
        return self.etag or self.last_modified or "none"


def http_session(retries: int = 4, backoff_s: float = 1.0) -> requests.Session:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff_s,
        status_forcelist=(500, 502, 503, 504),
        allowed_methods=frozenset({"GET", "HEAD"}),
        raise_on_status=False,
        respect_retry_after_header=True,
    )
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    return session


@dataclass
class Fetched:
    """An open response: ``not_modified`` or a body to stream."""

    url: str
    response: requests.Response | None
    validators: Validators
    max_bytes: int = DEFAULT_MAX_BODY_BYTES

    @property
    def not_modified(self) -> bool:
        return self.response is None

    def iter_bytes(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The decoded body in chunks of at most ``chunk_size`` (urllib3 >= 2.7 inflates
        a ``Content-Encoding`` in bounded steps); ``DecompressionLimitExceeded`` once
        more than ``max_bytes`` have come."""
        import requests

        assert self.response is not None
        try:
            yield from limit_chunks(
                self.response.iter_content(chunk_size),
                limit=self.max_bytes,
                what=f"the body of {self.url}",
            )
        except requests.RequestException as exc:
            raise FetchError(
                f"reading {self.url} failed (truncated or interrupted body): {exc}"
            ) from exc


@contextmanager
def fetch(
    url: str,
    *,
    previous: Validators | None = None,
    session: requests.Session | None = None,
    timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
    max_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Iterator[Fetched]:
    """GET ``url`` streaming. Yields ``Fetched``; raises ``FetchError`` on failure.

    With ``previous`` validators of this same URL, a 304 yields ``not_modified``;
    validators of another URL are not sent. Reading more than ``max_bytes`` of
    decoded body raises ``DecompressionLimitExceeded``.
    """
    import requests

    session = session or http_session()
    if previous is not None and previous.url != url:
        previous = None
    headers = previous.headers() if previous else {}
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as exc:
        raise FetchError(f"fetching {url} failed: {exc}") from exc
    with response:
        if response.status_code == 304 and previous is not None:
            yield Fetched(url, None, previous, max_bytes)
            return
        if response.status_code != 200:
            raise FetchError(
                f"fetching {url} failed: HTTP {response.status_code} {excerpt(response.reason)}",
                status=response.status_code,
            )
        validators = Validators(
            response.headers.get("ETag"), response.headers.get("Last-Modified"), url
        )
        yield Fetched(url, response, validators, max_bytes)


def fetch_bytes(
    url: str, *, previous: Validators | None = None, max_bytes: int = 256 << 20
) -> tuple[bytes | None, Validators]:
    """A small file whole with its validators; ``None`` as body when not modified."""
    with fetch(url, previous=previous, max_bytes=max_bytes) as fetched:
        if fetched.not_modified:
            return None, fetched.validators
        return b"".join(fetched.iter_bytes()), fetched.validators
