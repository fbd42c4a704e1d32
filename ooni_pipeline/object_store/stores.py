"""Object stores with all-or-nothing streaming writes.

``open_writer(key)`` returns a writer; the object appears under ``key`` only when
the ``with`` block ends without error. On S3 that is a multipart upload (aborted on
any error, so no partial object and no open upload is left behind); locally a
temporary file in the same directory renamed into place.

The S3 writer uploads parts from a background thread through a short queue, so a
producer reading from ClickHouse keeps reading while a part travels: a server
drops an HTTP query whose client stops reading for about 30 s.
"""

from __future__ import annotations

import hashlib
import os
import queue
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

MIN_PART_SIZE = 5 * 1024 * 1024
FILE_BLOCK = 8 * 1024 * 1024


class ObjectWriter(ABC):
    # The store's tag of the object once complete (S3's ETag), where it has one.
    etag: str | None = None

    @abstractmethod
    def write(self, data: bytes) -> None: ...


class ObjectStore(ABC):
    """The operations assets need, with the same keys on every backend."""

    @abstractmethod
    def open_writer(self, key: str) -> Any:
        """A context manager yielding an ``ObjectWriter``; commits on clean exit."""

    @abstractmethod
    def open_reader(self, key: str) -> IO[bytes]: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]: ...

    def etag(self, key: str) -> str | None:
        """The store's tag of the object's content (S3's ETag), without reading it;
        None where the store keeps none."""
        return None

    @abstractmethod
    def address(self, key: str) -> str:
        """Where a person finds the object (``s3://bucket/key`` or a path)."""

    @contextmanager
    def open_file_writer(self, key: str) -> Iterator[Path]:
        """A path on this machine for a writer that needs a file (e.g. ClickHouse's
        ``file()``): what is there when the block ends without error becomes the object
        ``key``; on error it is removed and the object is left as it was.

        Here the file is staged in the temporary directory, then streamed through
        ``open_writer``; stores on the local filesystem rename it into place."""
        _check_key(key)
        fd, tmp = tempfile.mkstemp(prefix=".object.", suffix=".partial")
        os.close(fd)
        try:
            yield Path(tmp)
            with open(tmp, "rb") as source, self.open_writer(key) as writer:
                while block := source.read(FILE_BLOCK):
                    writer.write(block)
        finally:
            os.unlink(tmp)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.open_writer(key) as writer:
            writer.write(data)

    def read_bytes(self, key: str) -> bytes:
        with self.open_reader(key) as reader:
            return reader.read()

    def read_bytes_if_exists(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is none: one request, not two."""
        if not self.exists(key):
            return None
        return self.read_bytes(key)


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"invalid object key: {key!r}")
    return key


class LocalObjectStore(ObjectStore):
    """A directory; keys are relative paths inside it."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    @contextmanager
    def _staged(self, key: str) -> Iterator[Path]:
        """A hidden ``.partial`` file beside the object, renamed into place when the
        block ends without error and removed otherwise (the caller makes it durable)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @contextmanager
    def open_writer(self, key: str) -> Iterator[ObjectWriter]:
        with self._staged(key) as tmp, open(tmp, "wb") as handle:
            yield _FileWriter(handle)
            handle.flush()
            os.fsync(handle.fileno())

    @contextmanager
    def open_file_writer(self, key: str) -> Iterator[Path]:
        """Staged beside the object (hidden, ``.partial``), renamed into place: no copy."""
        with self._staged(key) as tmp:
            yield tmp
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())

    def open_reader(self, key: str) -> IO[bytes]:
        return open(self._path(key), "rb")

    def read_bytes_if_exists(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        if not self.root.exists():
            return []
        keys = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.endswith(".partial"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def address(self, key: str) -> str:
        return str(self._path(key))


class _FileWriter(ObjectWriter):
    def __init__(self, handle: IO[bytes]):
        self._handle = handle

    def write(self, data: bytes) -> None:
        self._handle.write(data)


class S3ObjectStore(ObjectStore):
    """An S3 bucket (AWS or any S3-compatible endpoint) through a boto3 client."""

    def __init__(self, client: Any, bucket: str, part_size: int = 16 * 1024 * 1024):
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        self.client = client
        self.bucket = bucket
        self.part_size = part_size

    @contextmanager
    def open_writer(self, key: str) -> Iterator[ObjectWriter]:
        writer = _MultipartWriter(self.client, self.bucket, _check_key(key), self.part_size)
        try:
            yield writer
            writer.complete()
        except BaseException:
            writer.abort()
            raise

    def open_reader(self, key: str) -> IO[bytes]:
        return self.client.get_object(Bucket=self.bucket, Key=_check_key(key))["Body"]

    def read_bytes_if_exists(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=_check_key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        with response["Body"] as body:
            return body.read()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=_check_key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def list_keys(self, prefix: str) -> list[str]:
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def address(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def etag(self, key: str) -> str | None:
        return self.client.head_object(Bucket=self.bucket, Key=_check_key(key))["ETag"]


_DONE = object()


class _MultipartWriter(ObjectWriter):
    """Buffers writes into parts; a background thread uploads them in order."""

    def __init__(self, client: Any, bucket: str, key: str, part_size: int):
        self.client = client
        self.bucket = bucket
        self.key = key
        self.part_size = part_size
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, data: bytes) -> None:
        self._raise_if_failed()
        self._buffer += data
        while len(self._buffer) >= self.part_size:
            part = bytes(self._buffer[: self.part_size])
            del self._buffer[: self.part_size]
            self._send(part)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"upload of {self.key} failed: {self._error}") from self._error

    def _send(self, part: bytes) -> None:
        if self._thread is None:
            response = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)
            self._upload_id = response["UploadId"]
            self._thread = threading.Thread(
                target=self._upload_parts, name=f"upload {self.key}", daemon=True
            )
            self._thread.start()
        while True:  # don't block forever on a dead uploader
            self._raise_if_failed()
            try:
                self._queue.put(part, timeout=1.0)
                return
            except queue.Full:
                continue

    def _upload_parts(self) -> None:
        number = 0
        while True:
            part = self._queue.get()
            if part is _DONE:
                return
            if self._error is not None:
                continue  # drain so the producer is never blocked
            number += 1
            try:
                response = self.client.upload_part(
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=part,
                )
                self._parts.append({"PartNumber": number, "ETag": response["ETag"]})
            except BaseException as exc:  # handed to the producer thread
                self._error = exc

    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(_DONE)
            self._thread.join()

    def complete(self) -> None:
        if self._thread is None:
            # Small object: one PUT is just as atomic.
            response = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=bytes(self._buffer)
            )
            self.etag = response.get("ETag")
            return
        if self._buffer:
            self._send(bytes(self._buffer))
            self._buffer.clear()
        self._join()
        self._raise_if_failed()
        response = self.client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )
        self.etag = response.get("ETag")

    def abort(self) -> None:
        if self._thread is not None:
            self._error = self._error or RuntimeError("aborted")
            self._join()
        if self._upload_id is not None:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self._upload_id
            )
            self._upload_id = None


def object_digest(store: ObjectStore, key: str, max_bytes: int) -> tuple[str, int]:
    """(sha256 hex, bytes) of a published object, read no further than one byte past
    ``max_bytes`` (what was written): a check compares them with the recorded ones,
    which proves the object is, byte for byte, what the export validated and wrote."""
    digest = hashlib.sha256()
    size = 0
    with store.open_reader(key) as raw:
        while size <= max_bytes and (block := raw.read(min(1 << 20, max_bytes + 1 - size))):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size
