"""Anonymous reading of the published exports and feeds: the bucket policy, opt-in.

Objects are written private; this policy lets anyone read ``exports/`` and
``feeds/`` (``s3:GetObject``) and list those two prefixes (``s3:ListBucket`` with an
``s3:prefix`` condition, which ``aws s3 sync --no-sign-request`` and the globs of
DuckDB or ClickHouse need), and nothing else: the backups under
``clickhouse_export/`` stay private.

``python -m ooni_pipeline.operations.public_read`` prints the policy for
``$OONI_S3_BUCKET``; ``--apply`` merges it into the bucket's policy with
``PutBucketPolicy``. The statements are identified by their ``Sid``: applying again
replaces them (nothing changes when they are the same), and every other statement of
the bucket's policy is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

PUBLIC_PREFIXES = ("exports/", "feeds/")
SID_READ = "OoniPublicReadExportsFeeds"
SID_LIST = "OoniPublicListExportsFeeds"
POLICY_VERSION = "2012-10-17"


def public_read_statements(bucket: str) -> list[dict[str, Any]]:
    """The two statements that make ``exports/`` and ``feeds/`` of ``bucket`` public."""
    return [
        {
            "Sid": SID_READ,
            "Effect": "Allow",
            "Principal": "*",
            "Action": "s3:GetObject",
            "Resource": [f"arn:aws:s3:::{bucket}/{prefix}*" for prefix in PUBLIC_PREFIXES],
        },
        {
            "Sid": SID_LIST,
            "Effect": "Allow",
            "Principal": "*",
            "Action": "s3:ListBucket",
            "Resource": f"arn:aws:s3:::{bucket}",
            "Condition": {"StringLike": {"s3:prefix": [f"{p}*" for p in PUBLIC_PREFIXES]}},
        },
    ]


def public_read_policy(bucket: str) -> dict[str, Any]:
    """The policy a bucket holding only the project's objects needs."""
    return {"Version": POLICY_VERSION, "Statement": public_read_statements(bucket)}


def merge_public_read(existing: dict[str, Any] | None, bucket: str) -> dict[str, Any]:
    """``existing`` (a bucket policy, or None) with this project's statements in it:
    earlier copies of them (same ``Sid``) replaced, every other statement kept."""
    ours = public_read_statements(bucket)
    sids = {s["Sid"] for s in ours}
    policy = dict(existing or {"Version": POLICY_VERSION})
    statements = policy.get("Statement", [])
    if isinstance(statements, dict):  # a policy may hold a single statement as an object
        statements = [statements]
    policy["Statement"] = [s for s in statements if s.get("Sid") not in sids] + ours
    return policy


def current_policy(client: Any, bucket: str) -> dict[str, Any] | None:
    """The bucket's policy, or None when it has none."""
    from botocore.exceptions import ClientError

    try:
        return json.loads(client.get_bucket_policy(Bucket=bucket)["Policy"])
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "NoSuchBucketPolicy":
            return None
        raise


def apply_public_read(client: Any, bucket: str) -> tuple[dict[str, Any], bool]:
    """Merge the statements into the bucket's policy; returns the policy and whether
    it was written (False: it already held them as they are)."""
    existing = current_policy(client, bucket)
    merged = merge_public_read(existing, bucket)
    if existing is not None and merged == existing:
        return merged, False
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(merged))
    return merged, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ooni_pipeline.operations.public_read",
        description="Print (and with --apply, merge into the bucket's policy) the bucket "
        "policy that lets anyone read and list exports/ and feeds/ of $OONI_S3_BUCKET.",
    )
    parser.add_argument("--apply", action="store_true", help="merge it into the bucket's policy")
    parser.add_argument("--bucket", help="default $OONI_S3_BUCKET")
    args = parser.parse_args(argv)

    from ooni_pipeline.object_store import ObjectStoreResource, S3ObjectStore

    # The project's own store: $OONI_S3_BUCKET, $OONI_S3_ENDPOINT_URL, $AWS_REGION and
    # boto3's credential chain, as every run uses them.
    store = ObjectStoreResource(bucket=args.bucket).get_store()
    if not isinstance(store, S3ObjectStore):
        print(
            "no bucket: set OONI_S3_BUCKET (or --bucket); the local object store has no policy",
            file=sys.stderr,
        )
        return 2
    if not args.apply:
        print(json.dumps(public_read_policy(store.bucket), indent=2))
        return 0
    from botocore.exceptions import ClientError

    try:
        policy, changed = apply_public_read(store.client, store.bucket)
    except ClientError as error:
        # On AWS, S3 Block Public Access (on by default for new buckets) refuses a
        # public policy with AccessDenied: docs/operations.md says what to switch off.
        code = error.response.get("Error", {}).get("Code", "?")
        print(
            f"bucket {store.bucket}: the policy was not applied ({code}): {error}", file=sys.stderr
        )
        if code == "AccessDenied":
            print(
                "is Block Public Access on (BlockPublicPolicy, RestrictPublicBuckets)? "
                "see docs/operations.md, 'Public reading'",
                file=sys.stderr,
            )
        return 1
    print(json.dumps(policy, indent=2))
    state = "applied to" if changed else "already in the policy of"
    print(f"public read of exports/ and feeds/ {state} bucket {store.bucket}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
