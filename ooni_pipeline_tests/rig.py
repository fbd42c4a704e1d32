"""Test rig components: a fault-injecting HTTP server and a local git repository.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import zstandard

DEFAULT_LAST_MODIFIED = datetime(2026, 11, 1, tzinfo=UTC)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    truncate_to: int | None = None  # send Content-Length of the full body, then stop early
    reason: str | None = None  # the status line's reason phrase (None: the standard one)


class UpstreamServer:
    """Serves files by path. Queued faults are served first, then the file itself.

    Files get an ETag (sha256, unless put with ``etag=False``) and a Last-Modified
    header; a matching If-None-Match gets 304, and so does an If-Modified-Since not
    older than the file when no If-None-Match is sent (as Python's http.server does).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.last_modified: dict[str, datetime] = {}
        self.without_etag: set[str] = set()
        self.faults: dict[str, list[Reply]] = {}
        self.log: list[tuple[str, int, dict[str, str]]] = []
        self.posts: list[tuple[str, bytes]] = []  # (path, body) of POST requests, e.g. webhooks
        self.post_status = 200
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                reply = server._reply_for(self.path, dict(self.headers))
                server.log.append((self.path, reply.status, dict(self.headers)))
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                self.send_response(reply.status, reply.reason)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                body = reply.body if reply.truncate_to is None else reply.body[: reply.truncate_to]
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if reply.truncate_to is not None:
                    self.close_connection = True

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                server.posts.append((self.path, self.rfile.read(length)))
                self.send_response(server.post_status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def put(
        self,
        path: str,
        body: bytes | str,
        *,
        last_modified: datetime = DEFAULT_LAST_MODIFIED,
        etag: bool = True,
    ) -> str:
        """Serve ``body`` at ``path``; returns its URL."""
        data = body.encode() if isinstance(body, str) else body
        key = "/" + path.lstrip("/")
        with self._lock:
            self.files[key] = data
            self.last_modified[key] = last_modified
            (self.without_etag.discard if etag else self.without_etag.add)(key)
        return self.url(path)

    def remove(self, path: str) -> None:
        with self._lock:
            self.files.pop("/" + path.lstrip("/"), None)

    def fail(self, path: str, *replies: Reply) -> None:
        """Serve these replies, in order, before the file."""
        with self._lock:
            self.faults.setdefault("/" + path.lstrip("/"), []).extend(replies)

    def hits(self, path: str) -> list[int]:
        return [status for p, status, _ in self.log if p == "/" + path.lstrip("/")]

    def _reply_for(self, path: str, headers: dict[str, str]) -> Reply:
        with self._lock:
            queued = self.faults.get(path)
            if queued:
                return queued.pop(0)
            if path not in self.files:
                return Reply(404, b"not found")
            body = self.files[path]
            last_modified = self.last_modified[path]
            with_etag = path not in self.without_etag
        reply_headers = {"Last-Modified": format_datetime(last_modified, usegmt=True)}
        if with_etag:
            reply_headers["ETag"] = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if "If-None-Match" in headers:
            if headers["If-None-Match"] == reply_headers.get("ETag"):
                return Reply(304, b"", reply_headers)
        elif "If-Modified-Since" in headers:
            if parsedate_to_datetime(headers["If-Modified-Since"]) >= last_modified:
                return Reply(304, b"", reply_headers)
        return Reply(200, body, reply_headers)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class GitRepo:
    """A local git repository reachable by a file:// URL."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._git("init", "-q", "-b", "master")
        self._git("config", "user.email", "tests@example.org")
        self._git("config", "user.name", "tests")

    @property
    def url(self) -> str:
        return self.path.absolute().as_uri()

    def _git(self, *args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=self.path, check=True, capture_output=True, text=True
        ).stdout.strip()

    def commit(
        self, files: dict[str, bytes | str], message: str = "update", remove: tuple[str, ...] = ()
    ) -> str:
        """Write ``files`` (relative path -> content), remove others, commit; return the SHA."""
        for name, content in files.items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        for name in remove:
            (self.path / name).unlink()
        self._git("add", "-A")
        self._git("commit", "-q", "--allow-empty", "-m", message)
        return self._git("rev-parse", "HEAD")


class FaultyProxy:
    """An HTTP proxy in front of an S3 endpoint that fails chosen requests with 500.

    ``fail_when(method, path_and_query) -> bool`` picks the requests to fail.
    """

    def __init__(self, target: str, fail_when):
        import requests

        self.failed: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if fail_when(self.command, self.path):
                    proxy.failed.append(f"{self.command} {self.path}")
                    error = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length")
                }
                response = requests.request(
                    self.command, target + self.path, headers=headers, data=body, timeout=60
                )
                self.send_response(response.status_code)
                for name, value in response.headers.items():
                    if name.lower() not in (
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "content-encoding",
                    ):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(response.content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(response.content)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def materialization_metadata(result, key: str | None = None) -> dict:
    """Raw metadata values of a run's (last) materialization, of ``key`` if given."""
    events = [
        e
        for e in result.get_asset_materialization_events()
        if key is None or e.asset_key.to_user_string() == key
    ]
    return {k: getattr(v, "value", v) for k, v in events[-1].materialization.metadata.items()}


def failure_text(result) -> str:
    """The first step failure of a run, with its causes, as the UI shows it."""
    return result.get_step_failure_events()[0].step_failure_data.error.to_string()


def bomb(codec: str, size: int, head: bytes = b"", unit: bytes = b"\0") -> bytes:
    """A decompression bomb: ``head``, then ``unit`` repeated up to ``size`` bytes in all,
    gzip- or zstd-compressed as a stream (the uncompressed data is never held whole)."""
    compressor = (
        zlib.compressobj(1, zlib.DEFLATED, 31)
        if codec == "gzip"
        else zstandard.ZstdCompressor().compressobj()
    )
    block = unit * max(1, (1 << 20) // len(unit))
    parts = [compressor.compress(head)]
    left = size - len(head)
    while left > 0:
        parts.append(compressor.compress(block[:left]))
        left -= len(block)
    parts.append(compressor.flush())
    return b"".join(parts)


class PeakFileSize:
    """Samples, in a background thread, the largest file in ``directory`` while the
    ``with`` block runs: what a step wrote to disk at its peak, even if it deleted it."""

    def __init__(self, directory: Path, pattern: str = "*"):
        self.directory, self.pattern = directory, pattern
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for path in self.directory.glob(self.pattern):
                try:
                    self.peak = max(self.peak, path.stat().st_size)
                except FileNotFoundError:
                    pass
            time.sleep(0.001)

    def __enter__(self) -> PeakFileSize:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class S3Traffic:
    """What a boto3 S3 client sends to its endpoint (moto, in the rig), counted by
    botocore's own event hooks: per request its method, key, and the bytes of the
    bodies sent (as on the wire, retries included) and received (a HEAD's announced
    length is not received)."""

    def __init__(self, client) -> None:
        self.requests: list[tuple[str, str, int, int]] = []
        self._current = threading.local()
        client.meta.events.register("before-call.s3", self._before_call)
        client.meta.events.register("before-send.s3", self._before_send)
        client.meta.events.register("after-call.s3", self._after_call)

    def _before_call(self, model, params, **kwargs) -> None:
        from urllib.parse import unquote

        key = unquote(params.get("url_path", "").split("?")[0].lstrip("/"))
        self._current.request = [model.http["method"], key, 0]

    def _before_send(self, request, **kwargs) -> None:
        self._current.request[2] += int(request.headers.get("Content-Length") or 0)

    def _after_call(self, http_response, model, **kwargs) -> None:
        method, key, sent = self._current.request
        if method == "HEAD":
            received = 0
        elif model.has_streaming_output and http_response.status_code < 300:
            received = int(http_response.headers.get("content-length") or 0)
        else:
            received = len(http_response.content or b"")
        self.requests.append((method, key, sent, received))

    def clear(self) -> None:
        self.requests.clear()

    def keys(self, method: str | None = None) -> list[str]:
        return [k for m, k, _, _ in self.requests if method in (None, m)]

    @property
    def sent(self) -> int:
        return sum(r[2] for r in self.requests)

    @property
    def received(self) -> int:
        return sum(r[3] for r in self.requests)

    def summary(self) -> str:
        methods: dict[str, int] = {}
        for method, *_ in self.requests:
            methods[method] = methods.get(method, 0) + 1
        counts = " ".join(f"{m}={n}" for m, n in sorted(methods.items()))
        return (
            f"requests={len(self.requests)} ({counts}) "
            f"bytes_read={self.received} bytes_written={self.sent}"
        )


def export_history(
    first_day: str, days: int, consumers: tuple[str, ...] = ("c1", "c2", "c3", "c4", "c5")
) -> dict:
    """Manifest entries (asset key -> object key -> entry) of ``days`` days of every
    export from ``first_day``, as the exports record them: website_metrics, the daily
    aggregate (CSV + Parquet), the per-measurement Parquet, one watchlist per consumer
    each day, and the monthly rollup (CSV + Parquet) of each month they cover."""
    from datetime import date, timedelta

    from ooni_pipeline.exports import aggregates, parquet, watchlists, website_metrics
    from ooni_pipeline.exports.manifest import upload_entry
    from ooni_pipeline.object_store import UploadResult

    history: dict = {}

    def add(asset_key, partition: str, key: str, fmt: str) -> None:
        digest = hashlib.sha256(f"{key}@{partition}".encode()).hexdigest()
        size = 40_000 + int(digest[:4], 16)
        upload = UploadResult(key, f"s3://b/{key}", size * 6, size, digest, 1.0)
        entry = upload_entry(upload, size // 40, fmt, asset_key, partition, f"{size}@{digest[:8]}")
        history.setdefault(asset_key, {})[key] = entry

    start = date.fromisoformat(first_day)
    months = []
    for n in range(days):
        day = (start + timedelta(days=n)).isoformat()
        add(website_metrics.WEBSITE_METRICS_KEY, day, website_metrics.object_key(day), "csv.gz")
        add(aggregates.DAILY_KEY, day, aggregates.daily_key(day), "csv.gz")
        add(aggregates.DAILY_KEY, day, aggregates.daily_parquet_key(day), "parquet")
        add(parquet.WEBSITE_METRICS_PARQUET_KEY, day, parquet.parquet_key(day), "parquet")
        for consumer in consumers:
            key = watchlists.object_key(consumer, day)
            add(watchlists.asset_key(consumer), day, key, "csv.gz")
        if day[:7] not in months:
            months.append(day[:7])
    for month in months:
        add(aggregates.MONTHLY_KEY, month, aggregates.monthly_key(month), "csv.gz")
        add(aggregates.MONTHLY_KEY, month, aggregates.monthly_parquet_key(month), "parquet")
    return history
