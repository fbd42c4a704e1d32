"""Object stores and the streaming upload, on the moto S3 server and a local directory."""

from __future__ import annotations

import gzip
import os

import pytest
import zstandard

from ooni_pipeline.object_store import ObjectStoreResource, stream_upload
from ooni_pipeline.object_store.stores import LocalObjectStore
from ooni_pipeline_tests.rig import FaultyProxy


def _chunks(total_mb: int):
    for _ in range(total_mb):
        yield os.urandom(1024 * 1024)  # incompressible, so parts really are full


def test_streaming_upload_round_trip(object_store_resource: ObjectStoreResource) -> None:
    store = object_store_resource.get_store()
    payload = [f"{i},row {i}\n".encode() for i in range(100_000)]
    result = stream_upload(store, "exports/x/a.csv.gz", iter(payload), "gzip")
    assert store.exists("exports/x/a.csv.gz")
    assert gzip.decompress(store.read_bytes("exports/x/a.csv.gz")) == b"".join(payload)
    assert result.raw_bytes == sum(map(len, payload))
    assert result.bytes == len(store.read_bytes("exports/x/a.csv.gz"))
    assert store.list_keys("exports/") == ["exports/x/a.csv.gz"]


def test_multipart_upload_of_many_parts(
    s3_store_resource: ObjectStoreResource, s3_client, s3_bucket: str
) -> None:
    store = s3_store_resource.get_store()  # 5 MiB parts
    result = stream_upload(store, "big.bin.zst", _chunks(17), "zstd")
    head = s3_client.head_object(Bucket=s3_bucket, Key="big.bin.zst")
    assert head["ContentLength"] == result.bytes
    assert "-" in head["ETag"]  # a multipart ETag
    data = zstandard.ZstdDecompressor().stream_reader(store.open_reader("big.bin.zst")).read()
    assert len(data) == 17 * 1024 * 1024


def _failing_after(mb: int):
    yield from _chunks(mb)
    raise RuntimeError("injected failure mid-object")


def test_failed_multipart_upload_leaves_nothing(
    s3_store_resource: ObjectStoreResource, s3_client, s3_bucket: str
) -> None:
    store = s3_store_resource.get_store()
    with pytest.raises(RuntimeError, match="injected failure"):
        stream_upload(store, "clickhouse_export/csv/t.csv.zstd", _failing_after(12), "none")
    assert not store.exists("clickhouse_export/csv/t.csv.zstd")
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_failed_upload_keeps_the_previous_object(
    object_store_resource: ObjectStoreResource,
) -> None:
    store = object_store_resource.get_store()
    store.put_bytes("k/obj", b"previous")
    with pytest.raises(RuntimeError):
        stream_upload(store, "k/obj", _failing_after(11), "gzip")
    assert store.read_bytes("k/obj") == b"previous"
    assert store.list_keys("k/") == ["k/obj"]  # no temporary file left behind


def test_part_upload_error_surfaces(moto_endpoint: str, s3_client, s3_bucket: str) -> None:
    """S3 answering 500 to part 2 (and to every retry of it), through the faulty proxy in
    front of moto, fails the writer, aborts the upload and keeps the previous object."""
    key = "x.bin"
    proxy = FaultyProxy(
        moto_endpoint, lambda method, path: method == "PUT" and "partNumber=2" in path
    )
    try:
        store = ObjectStoreResource(
            bucket=s3_bucket, endpoint_url=proxy.url, region_name="us-east-1", part_size_mb=5
        ).get_store()
        store.put_bytes(key, b"previous")
        with pytest.raises(RuntimeError, match="upload of x.bin failed: .*UploadPart"):
            stream_upload(store, key, _chunks(30), "none")
    finally:
        proxy.close()
    assert proxy.failed and all("partNumber=2" in request for request in proxy.failed)
    assert s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == b"previous"
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_local_store_rejects_escaping_keys(tmp_path) -> None:
    store = LocalObjectStore(tmp_path)
    for bad in ["../x", "/abs", "a/../../b", ""]:
        with pytest.raises(ValueError, match="invalid object key"):
            store.put_bytes(bad, b"x")


def test_resource_defaults_to_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("OONI_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("OONI_S3_BUCKET", raising=False)
    store = ObjectStoreResource().get_store()
    assert isinstance(store, LocalObjectStore) and store.root == tmp_path / "objects"
