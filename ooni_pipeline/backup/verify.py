"""The restore check: the engine reads a backup object and fingerprints it.

ClickHouse reads the object where it lies (``file()`` for the embedded database and
the local object store, ``s3()`` for a bucket) with the table's ``SELECT *``
structure and returns the same row count and checksum the backup recorded
(``plan.fingerprint_sql``): no scratch table, no temporary file, and the object's
bytes never pass through Python. Reading stops one row past the recorded count,
so an object that unpacks to more rows than were written (a decompression bomb)
costs no more than the real object would.

S3 credentials, when the object store has any, reach the engine as bound query
parameters: never in the query text, so never in an error message built from it;
ClickHouse's own errors name the bucket and key only.

When the engine cannot read the object (a ClickHouse server and the local object
store, which the server cannot see; a server that cannot reach the bucket), the
object is streamed into a scratch table instead (``restore_and_compare``); on a
server that stream travels over HTTP, so it writes no local temporary file either.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from ooni_pipeline.backup.plan import fingerprint_sql, table_structure
from ooni_pipeline.clickhouse import ClickHouse, ClickHouseError, quote_identifier
from ooni_pipeline.decompression import DecompressionLimitExceeded, iter_bounded
from ooni_pipeline.object_store.stores import LocalObjectStore, ObjectStore, S3ObjectStore

MB = 1024 * 1024
NO_RECORDED_SIZE = "the manifest records no rows and uncompressed_bytes to bound the check with"
# Characters s3() would read as a glob or a URL part rather than as the key.
_NOT_LITERAL = set("*?{}[]")
# The engine retries S3 requests up to 100 times by default: a check names an
# unreachable bucket after a few.
_S3_SETTINGS = (
    "s3_retry_attempts = 3, s3_max_single_read_retries = 3, s3_connect_timeout_ms = 10000"
)
# Error codes that mean the engine could not reach the object, not that it is bad.
_UNREACHABLE = (
    "(S3_ERROR)",
    "(NETWORK_ERROR)",
    "(POCO_EXCEPTION)",
    "(ALL_CONNECTION_TRIES_FAILED)",
)


def short_error(exc: BaseException, limit: int = 300) -> str:
    """An error on one line, escaped and cut short: parse errors quote the object."""
    text = " ".join(str(exc).split())
    text = text.encode("ascii", "backslashreplace").decode()
    return text if len(text) <= limit else text[:limit] + "..."


def _s3_credentials(store: S3ObjectStore) -> tuple[str, str, str] | None:
    """The client's own credentials (boto3's chain), or None for anonymous access."""
    getter = getattr(store.client, "_get_credentials", None)
    credentials = getter() if getter else None
    if credentials is None:
        return None
    frozen = credentials.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key, frozen.token or ""


def _s3_url(store: S3ObjectStore, key: str) -> str:
    """The object's URL: virtual-hosted in the bucket's region on AWS, path-style on
    any other endpoint (MinIO, R2, moto), as boto3 addresses them."""
    endpoint = store.client.meta.endpoint_url.rstrip("/")
    region = store.client.meta.region_name
    if endpoint in ("https://s3.amazonaws.com", f"https://s3.{region}.amazonaws.com") and region:
        return f"https://{store.bucket}.s3.{region}.amazonaws.com/{quote(key)}"
    return f"{endpoint}/{store.bucket}/{quote(key)}"


def object_source(
    ch: ClickHouse, store: ObjectStore, key: str, structure: str
) -> tuple[str, dict[str, Any]] | None:
    """A table function reading the object, and its parameters; None if the engine
    cannot reach it."""
    params: dict[str, Any] = {"structure": structure}
    if _NOT_LITERAL & set(key):
        return None
    if isinstance(store, LocalObjectStore):
        if not ch.embedded:
            return None
        params["path"] = store.address(key)
        return "file({path:String}, 'CSVWithNames', {structure:String}, 'zstd')", params
    if isinstance(store, S3ObjectStore):
        params["url"] = _s3_url(store, key)
        credentials = _s3_credentials(store)
        if credentials is None:
            return "s3({url:String}, 'CSVWithNames', {structure:String}, 'zstd')", params
        params["key_id"], params["secret"], params["token"] = credentials
        auth = "{key_id:String}, {secret:String}, {token:String}"
        return f"s3({{url:String}}, {auth}, 'CSVWithNames', {{structure:String}}, 'zstd')", params
    return None


def verify_object(
    ch: ClickHouse,
    store: ObjectStore,
    table: str,
    key: str,
    entry: dict[str, Any],
    max_threads: int = 2,
) -> dict[str, Any]:
    """Compare the object's row count and checksum, as the engine reads them, with
    the manifest entry."""
    expected = entry.get("fingerprint")
    rows = entry.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        return {"match": False, "expected": expected, "error": NO_RECORDED_SIZE}
    source = object_source(ch, store, key, table_structure(ch, table))
    if source is None:
        return {**restore_and_compare(ch, store, table, key, entry), "read_by": "scratch table"}
    function, params = source
    settings = f"max_threads = {int(max_threads)}"
    if function.startswith("s3("):
        settings += f", {_S3_SETTINGS}"
    sql = (
        f"SELECT count(), sum(h) FROM (SELECT cityHash64(*) AS h FROM {function} "
        f"LIMIT {{bound:UInt64}}) SETTINGS {settings}"
    )
    try:
        count, checksum = ch.query_rows(sql, {**params, "bound": rows + 1})[0]
    except ClickHouseError as exc:
        if not ch.embedded and any(code in str(exc) for code in _UNREACHABLE):
            result = restore_and_compare(ch, store, table, key, entry)
            return {**result, "read_by": "scratch table (the server cannot read the object)"}
        return {"match": False, "expected": expected, "error": short_error(exc)}
    if int(count) > rows:
        return {
            "match": False,
            "expected": expected,
            "error": f"{key} unpacks to more than the {rows} rows recorded",
        }
    found = f"{int(count)}:{int(checksum):016x}"
    return {
        "rows": int(count),
        "fingerprint": found,
        "expected": expected,
        "match": found == expected,
        "read_by": "engine",
    }


def restore_and_compare(
    ch: ClickHouse, store: ObjectStore, table: str, key: str, entry: dict[str, Any]
) -> dict[str, Any]:
    """The fallback: load the object into a scratch copy of ``table`` and fingerprint it.

    The object is unpacked up to the size recorded when it was written, no further: one
    that unpacks to more is not the backup (it may be a decompression bomb) and fails
    the comparison without being restored.
    """
    limit = entry.get("uncompressed_bytes")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        return {"match": False, "expected": entry.get("fingerprint"), "error": NO_RECORDED_SIZE}
    scratch = quote_identifier(f"_restore_check_{table}")
    ch.command(f"DROP TABLE IF EXISTS {scratch}")
    ch.command(
        f"CREATE TABLE {scratch} AS {quote_identifier(table)} ENGINE = MergeTree ORDER BY tuple()"
    )
    try:
        with store.open_reader(key) as raw:
            ch.raw_insert(
                f"_restore_check_{table}",
                iter_bounded(raw, "zstd", limit=limit, what=key, chunk_size=4 * MB),
                fmt="CSVWithNames",
            )
        rows, checksum = ch.query_rows(fingerprint_sql(scratch))[0]
    except DecompressionLimitExceeded as exc:
        return {"match": False, "expected": entry["fingerprint"], "error": str(exc)}
    except ClickHouseError as exc:
        return {"match": False, "expected": entry.get("fingerprint"), "error": short_error(exc)}
    finally:
        ch.command(f"DROP TABLE IF EXISTS {scratch}")
    restored = f"{int(rows)}:{int(checksum):016x}"
    return {
        "rows": int(rows),
        "fingerprint": restored,
        "expected": entry["fingerprint"],
        "match": restored == entry["fingerprint"],
    }
