"""Public reading of exports/ and feeds/ (#26, 2): the bucket policy applied to moto's
S3 server and checked with anonymous (unsigned) requests, as a consumer makes them.

What moto 5.2.5 enforces for a request without credentials: the bucket policy (and
the object's ACL) on GET of an existing object; not on listing (anonymous listing is
always allowed there), not on HEAD (moto asks for an ``s3:HeadObject`` action that no
policy names), and a missing key answers 404 where AWS answers 403 to a reader without
``s3:ListBucket``. The listing statement is therefore checked as a document, and the
listing AWS would refuse is a strict xfail: it turns into a failure the day moto
enforces it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from ooni_pipeline.object_store import ObjectStoreResource
from ooni_pipeline.operations import public_read

ROOT = Path(__file__).resolve().parent.parent

PUBLIC = {
    "exports/website_metrics/2024-03-10.csv.gz": b"csv of the day",
    "exports/parquet/website_metrics/day=2024-03-10/website_metrics_2024-03-10.parquet": b"pq",
    "exports/manifest.json": b'{"objects": {}}',
    "feeds/blocking/global.atom": b"<feed/>",
}
PRIVATE = {
    "clickhouse_export/csv/fastpath_202403.csv.zstd": b"backup",
    "clickhouse_export/manifests/fastpath.json": b"{}",
    "exportsX/not-a-prefix.csv": b"x",  # shares exports' first letters, not its prefix
    "scratch/notes.txt": b"x",
}
# A statement the operator had before: it must survive, and keep working.
OPERATORS = {
    "Sid": "OperatorNotes",
    "Effect": "Allow",
    "Principal": "*",
    "Action": "s3:GetObject",
    "Resource": "arn:aws:s3:::{bucket}/notes/*",
}


@pytest.fixture
def anonymous(moto_endpoint: str):
    """An S3 client that signs nothing: no credentials, as ``--no-sign-request``."""
    return boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        config=Config(signature_version=UNSIGNED),
    )


@pytest.fixture
def bucket_env(monkeypatch, moto_endpoint: str, s3_bucket: str) -> str:
    """The project's configuration naming the test bucket."""
    monkeypatch.setenv("OONI_S3_BUCKET", s3_bucket)
    monkeypatch.setenv("OONI_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return s3_bucket


def _status(call) -> int:
    try:
        call()
    except ClientError as error:
        return error.response["ResponseMetadata"]["HTTPStatusCode"]
    return 200


def _get(anonymous, bucket: str, key: str) -> int:
    return _status(lambda: anonymous.get_object(Bucket=bucket, Key=key)["Body"].read())


def _apply_with_the_documented_command() -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ooni_pipeline.operations.public_read", "--apply"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _sids(s3_client, bucket: str) -> list[str]:
    policy = json.loads(s3_client.get_bucket_policy(Bucket=bucket)["Policy"])
    return [s.get("Sid") for s in policy["Statement"]]


def test_anonymous_reads_exports_and_feeds_once_applied_and_nothing_else(
    bucket_env: str, s3_client, anonymous, s3_store_resource: ObjectStoreResource
) -> None:
    bucket = bucket_env
    store = s3_store_resource.get_store()  # written as every export is: multipart, private
    for key, data in {**PUBLIC, **PRIVATE, "notes/readme.txt": b"n"}.items():
        store.put_bytes(key, data)
    operators = json.loads(json.dumps(OPERATORS).replace("{bucket}", bucket))
    s3_client.put_bucket_policy(
        Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [operators]})
    )

    # As written: private, the README's promise broken (#26).
    assert {k: _get(anonymous, bucket, k) for k in PUBLIC} == dict.fromkeys(PUBLIC, 403)
    assert _get(anonymous, bucket, "notes/readme.txt") == 200

    done = _apply_with_the_documented_command()
    assert done.returncode == 0, done.stderr
    assert f"applied to bucket {bucket}" in done.stderr
    assert json.loads(done.stdout) == json.loads(
        s3_client.get_bucket_policy(Bucket=bucket)["Policy"]
    )

    for key, data in PUBLIC.items():
        assert anonymous.get_object(Bucket=bucket, Key=key)["Body"].read() == data, key
    assert {k: _get(anonymous, bucket, k) for k in PRIVATE} == dict.fromkeys(PRIVATE, 403)
    assert _get(anonymous, bucket, "notes/readme.txt") == 200  # the operator's, kept
    # Reading is all it grants: no anonymous overwrite or delete of an export.
    key = "exports/manifest.json"
    assert _status(lambda: anonymous.put_object(Bucket=bucket, Key=key, Body=b"x")) == 403
    assert _status(lambda: anonymous.delete_object(Bucket=bucket, Key=key)) == 403
    assert store.read_bytes(key) == PUBLIC[key]

    # What a consumer's sync lists (moto lists anonymously whatever the policy).
    listed = anonymous.list_objects_v2(Bucket=bucket, Prefix="exports/")
    assert {o["Key"] for o in listed["Contents"]} == {k for k in PUBLIC if k.startswith("exports/")}

    # Again: the same policy, one copy of each statement, the operator's first.
    before = s3_client.get_bucket_policy(Bucket=bucket)["Policy"]
    policy, changed = public_read.apply_public_read(s3_client, bucket)
    assert not changed
    assert s3_client.get_bucket_policy(Bucket=bucket)["Policy"] == before
    assert _sids(s3_client, bucket) == [
        "OperatorNotes",
        public_read.SID_READ,
        public_read.SID_LIST,
    ]


def test_applying_to_a_bucket_without_policy_then_after_a_change_of_ours(
    bucket_env: str, s3_client, anonymous
) -> None:
    bucket = bucket_env
    s3_client.put_object(Bucket=bucket, Key="feeds/blocking/IT.atom", Body=b"<feed/>")
    with pytest.raises(ClientError):
        s3_client.get_bucket_policy(Bucket=bucket)
    assert _get(anonymous, bucket, "feeds/blocking/IT.atom") == 403
    assert public_read.main(["--apply"]) == 0
    assert _get(anonymous, bucket, "feeds/blocking/IT.atom") == 200
    # An older or hand-edited copy of our statement is replaced, not duplicated.
    policy = json.loads(s3_client.get_bucket_policy(Bucket=bucket)["Policy"])
    policy["Statement"][0]["Resource"] = f"arn:aws:s3:::{bucket}/feeds/blocking/IT.atom"
    s3_client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    _, changed = public_read.apply_public_read(s3_client, bucket)
    assert changed
    assert _sids(s3_client, bucket) == [public_read.SID_READ, public_read.SID_LIST]
    assert json.loads(s3_client.get_bucket_policy(Bucket=bucket)["Policy"]) == (
        public_read.public_read_policy(bucket)
    )


@pytest.mark.xfail(
    strict=True,
    reason="moto 5.2.5 does not apply bucket policies to anonymous ListObjects: "
    "AWS refuses this listing (no statement allows the prefix)",
)
def test_anonymous_listing_outside_exports_and_feeds_is_refused(
    bucket_env: str, s3_client, anonymous
) -> None:
    s3_client.put_object(Bucket=bucket_env, Key="clickhouse_export/csv/t.csv.zstd", Body=b"b")
    assert public_read.main(["--apply"]) == 0
    for prefix in ("", "clickhouse_export/"):
        assert (
            _status(lambda p=prefix: anonymous.list_objects_v2(Bucket=bucket_env, Prefix=p)) == 403
        )


def test_the_policy_grants_reading_exports_and_feeds_and_listing_only_those() -> None:
    # The document itself (moto does not enforce the listing statement, above).
    read, listing = public_read.public_read_statements("ooni-data")
    assert read["Effect"] == listing["Effect"] == "Allow"
    assert read["Principal"] == listing["Principal"] == "*"
    assert read["Action"] == "s3:GetObject"
    assert read["Resource"] == [
        "arn:aws:s3:::ooni-data/exports/*",
        "arn:aws:s3:::ooni-data/feeds/*",
    ]
    assert listing["Action"] == "s3:ListBucket"
    assert listing["Resource"] == "arn:aws:s3:::ooni-data"
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["exports/*", "feeds/*"]}}


def test_a_policy_holding_one_statement_as_an_object_keeps_it() -> None:
    existing = {"Version": "2012-10-17", "Statement": {"Sid": "Other", "Effect": "Deny"}}
    merged = public_read.merge_public_read(existing, "b")
    assert merged["Statement"][0] == {"Sid": "Other", "Effect": "Deny"}
    assert [s.get("Sid") for s in merged["Statement"][1:]] == [
        public_read.SID_READ,
        public_read.SID_LIST,
    ]


def test_without_a_bucket_it_prints_the_policy_for_none_and_says_why(
    monkeypatch, capsys, tmp_path: Path
) -> None:
    monkeypatch.delenv("OONI_S3_BUCKET", raising=False)
    monkeypatch.setenv("OONI_DATA_DIR", str(tmp_path))
    assert public_read.main([]) == 2
    assert "set OONI_S3_BUCKET" in capsys.readouterr().err


def test_printing_changes_nothing(bucket_env: str, s3_client, capsys) -> None:
    assert public_read.main([]) == 0
    assert json.loads(capsys.readouterr().out) == public_read.public_read_policy(bucket_env)
    with pytest.raises(ClientError):
        s3_client.get_bucket_policy(Bucket=bucket_env)


def test_the_policy_in_the_operations_guide_is_the_one_applied() -> None:
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text.split("## Public reading", 1)[1]
    documented = section.split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(documented) == public_read.public_read_policy("ooni-data")
