"""Fetching upstream files over HTTP(S): the one place for timeouts, retries and conditional GET.

Retries (with exponential backoff) cover connection errors and 5xx answers; a 4xx
is final and reported with the URL. A conditional GET sends the validators of the
last successful fetch (ETag, Last-Modified) so an unchanged file costs one 304; the
validators belong to the URL that gave them and are sent to no other (a mirror's
older file must not pass as "not modified" without being validated).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

USER_AGENT = "ooni-pipeline/0.1 (+https://github.com/ooni)"
CONNECT_TIMEOUT_S = 15
READ_TIMEOUT_S = 120


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

    @property
    def not_modified(self) -> bool:
        return self.response is None

    def iter_bytes(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        assert self.response is not None
        try:
            yield from self.response.iter_content(chunk_size)
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
) -> Iterator[Fetched]:
    """GET ``url`` streaming. Yields ``Fetched``; raises ``FetchError`` on failure.

    With ``previous`` validators of this same URL, a 304 yields ``not_modified``;
    validators of another URL are not sent.
    """
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
            yield Fetched(url, None, previous)
            return
        if response.status_code != 200:
            raise FetchError(
                f"fetching {url} failed: HTTP {response.status_code} {response.reason}",
                status=response.status_code,
            )
        validators = Validators(
            response.headers.get("ETag"), response.headers.get("Last-Modified"), url
        )
        yield Fetched(url, response, validators)


def fetch_bytes(
    url: str, *, previous: Validators | None = None, max_bytes: int = 256 << 20
) -> tuple[bytes | None, Validators]:
    """A small file whole with its validators; ``None`` as body when not modified."""
    with fetch(url, previous=previous) as fetched:
        if fetched.not_modified:
            return None, fetched.validators
        body = bytearray()
        for chunk in fetched.iter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise FetchError(f"{url} is larger than {max_bytes} bytes")
        return bytes(body), fetched.validators
