"""The restore check: the engine reads a backup object and fingerprints it.

ClickHouse reads the object where it lies (``file()`` for the embedded database and
the local object store, ``url()`` for a bucket): no scratch table, no temporary file,
and the object's bytes never pass through Python. Two readings, one cheap and one
thorough:

- ``lines``: the object read as lines (``LineAsString``), their count and checksum
  compared with the ones the export recorded (``export.ExportTally``): the object
  holds, line for line, the engine's CSV of the fingerprinted rows. Unpacking and
  hashing lines costs about a tenth of parsing CSV into types; the check reads the
  objects a backup just wrote this way.
- ``typed``: the object parsed with the table's ``SELECT *`` structure, as a restore
  would, its row count and checksum compared with the fingerprint
  (``plan.fingerprint_sql``): it proves an older object still restores into the
  table as it is today; the check's rotating sample of older objects is read this
  way (and any object recorded before lines were).

Reading stops one row (line) past the recorded count, so an object that unpacks to
more than was written (a decompression bomb) costs no more than the real one.

A bucket's object is read through a presigned GET URL (``url()``): the engine never
sees the store's credentials, only a signature good for reading that one object for
a few minutes; and errors are shown without the URL's query string, where the
signature is.

When the engine cannot read the object (a ClickHouse server and the local object
store, which the server cannot see; a server that cannot reach the bucket), the
object is streamed into a scratch table instead (``restore_and_compare``); on a
server that stream travels over HTTP, so it writes no local temporary file either.
"""

from __future__ import annotations

import re
from typing import Any

from ooni_pipeline.backup.plan import fingerprint_sql, table_structure
from ooni_pipeline.clickhouse import ClickHouse, ClickHouseError, quote_identifier
from ooni_pipeline.decompression import DecompressionLimitExceeded, iter_bounded
from ooni_pipeline.object_store.stores import LocalObjectStore, ObjectStore, S3ObjectStore

MB = 1024 * 1024
NO_RECORDED_SIZE = "the manifest records no rows and uncompressed_bytes to bound the check with"
# Characters s3() would read as a glob or a URL part rather than as the key.
_NOT_LITERAL = set("*?{}[]")
# A check names an unreachable bucket after a few tries, not the engine's default.
_URL_SETTINGS = "http_max_tries = 3, http_connection_timeout = 10"
# Error codes that mean the engine could not reach the object, not that it is bad.
_UNREACHABLE = (
    "(S3_ERROR)",
    "(NETWORK_ERROR)",
    "(POCO_EXCEPTION)",
    "(ALL_CONNECTION_TRIES_FAILED)",
)


_URL_QUERY = re.compile(r"(https?://[^\s?'\"]*)\?[^\s'\"]*")


def short_error(exc: BaseException, limit: int = 300) -> str:
    """An error on one line, escaped and cut short: parse errors quote the object,
    and a URL's query string (a presigned URL's signature) is left out."""
    text = _URL_QUERY.sub(r"\1?…", " ".join(str(exc).split()))
    text = text.encode("ascii", "backslashreplace").decode()
    return text if len(text) <= limit else text[:limit] + "..."


PRESIGNED_URL_TTL_S = 900


def _presigned_url(store: S3ObjectStore, key: str) -> str:
    """A GET URL of the object, signed by the store's own client (its endpoint,
    region and addressing style), valid for ``PRESIGNED_URL_TTL_S``."""
    return store.client.generate_presigned_url(
        "get_object",
        Params={"Bucket": store.bucket, "Key": key},
        ExpiresIn=PRESIGNED_URL_TTL_S,
    )


LINES_STRUCTURE = "line String"


def object_source(
    ch: ClickHouse, store: ObjectStore, key: str, fmt: str, structure: str
) -> tuple[str, dict[str, Any]] | None:
    """A table function reading the object in format ``fmt``, and its parameters;
    None if the engine cannot reach it."""
    params: dict[str, Any] = {"structure": structure}
    if _NOT_LITERAL & set(key):
        return None
    if isinstance(store, LocalObjectStore):
        if not ch.embedded:
            return None
        params["path"] = store.address(key)
        return f"file({{path:String}}, '{fmt}', {{structure:String}}, 'zstd')", params
    if isinstance(store, S3ObjectStore):
        params["url"] = _presigned_url(store, key)
        return f"url({{url:String}}, '{fmt}', {{structure:String}}, 'zstd')", params
    return None


def _recorded(entry: dict[str, Any], field: str) -> tuple[str, int] | None:
    """A recorded ``count:checksum`` and its count, if well formed."""
    value = entry.get(field)
    if not isinstance(value, str) or not re.fullmatch(r"\d{1,19}:[0-9a-f]{16}", value):
        return None
    return value, int(value.split(":")[0])


def verify_object(
    ch: ClickHouse,
    store: ObjectStore,
    table: str,
    key: str,
    entry: dict[str, Any],
    max_threads: int = 2,
    reading: str = "typed",
) -> dict[str, Any]:
    """Compare the object's count and checksum, as the engine reads them, with the
    manifest entry: of its lines (``reading="lines"``, when the entry records them)
    or of its rows parsed into the table's types (``"typed"``)."""
    if reading == "lines" and _recorded(entry, "lines"):
        expected, count = _recorded(entry, "lines")
        unit, fmt, structure, hashed = "lines", "LineAsString", LINES_STRUCTURE, "cityHash64(line)"
    else:
        reading, unit, fmt, hashed = "typed", "rows", "CSVWithNames", "cityHash64(*)"
        expected = entry.get("fingerprint")
        count = entry.get("rows")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return {"match": False, "expected": expected, "error": NO_RECORDED_SIZE}
        structure = table_structure(ch, table)
    source = object_source(ch, store, key, fmt, structure)
    if source is None:
        return {**restore_and_compare(ch, store, table, key, entry), "read_by": "scratch table"}
    function, params = source
    settings = f"max_threads = {int(max_threads)}"
    if function.startswith("url("):
        settings += f", {_URL_SETTINGS}"
    sql = (
        f"SELECT count(), sum(h) FROM (SELECT {hashed} AS h FROM {function} "
        f"LIMIT {{bound:UInt64}}) SETTINGS {settings}"
    )
    try:
        found_count, checksum = ch.query_rows(sql, {**params, "bound": count + 1})[0]
    except ClickHouseError as exc:
        if not ch.embedded and any(code in str(exc) for code in _UNREACHABLE):
            result = restore_and_compare(ch, store, table, key, entry)
            return {**result, "read_by": "scratch table (the server cannot read the object)"}
        return {"match": False, "expected": expected, "error": short_error(exc)}
    if int(found_count) > count:
        return {
            "match": False,
            "expected": expected,
            "error": f"{key} unpacks to more than the {count} {unit} recorded",
        }
    found = f"{int(found_count)}:{int(checksum):016x}"
    return {
        unit: int(found_count),
        "fingerprint": found,
        "expected": expected,
        "match": found == expected,
        "read_by": f"engine ({reading})",
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
