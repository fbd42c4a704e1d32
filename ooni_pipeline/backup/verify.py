"""The restore check: the engine reads a backup object and fingerprints it.

ClickHouse reads the object where it lies (``file()`` for the embedded database and
the local object store, ``url()`` for a bucket): no scratch table, no temporary file,
and the object's bytes never pass through Python. Two readings, one cheap and one
thorough:

- ``lines``: the object is byte for byte the one uploaded (sha256 and size, as the
  manifest records them), and the engine unpacks it, verifying zstd's content
  checksum as it goes, to the lines and bytes the export counted (the export made
  sure those were all the lines the fingerprinted rows make, see ``export``).
  Unpacking and counting lines costs about a tenth of parsing CSV into types; the
  check reads the objects a backup just wrote this way.
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

from ooni_pipeline.backup.plan import (
    LEGACY_ROW_HASH,
    ROW_HASH_VERSION,
    fingerprint_sql,
    fingerprint_text,
    row_hash_sql,
    select_star_columns,
    table_structure,
)
from ooni_pipeline.clickhouse import ClickHouse, ClickHouseError, quote_identifier
from ooni_pipeline.decompression import DecompressionLimitExceeded, iter_bounded
from ooni_pipeline.object_store.stores import (
    LocalObjectStore,
    ObjectStore,
    S3ObjectStore,
    object_digest,
)

MB = 1024 * 1024
NO_RECORDED_SIZE = "the manifest records no rows and uncompressed_bytes to bound the check with"
# Characters file() or url() would read as a glob rather than as the key.
_NOT_LITERAL = set("*?{}[]")
# A check names an unreachable bucket after a few tries, not the engine's default.
_URL_SETTINGS = "http_max_tries = 3, http_connection_timeout = 10"
# Error codes that mean the engine could not reach the object, not that it is bad.
_UNREACHABLE = (
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


def _count(entry: dict[str, Any], field: str) -> int | None:
    value = entry.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return None
    return value


def entry_row_hash(ch: ClickHouse, table: str, entry: dict[str, Any]) -> str:
    """The row hash the entry's fingerprint was made with (``plan.row_hash_sql``, or
    before its version was recorded ``LEGACY_ROW_HASH``, which ClickHouse 24.8 cannot
    compute for a row holding a NULL: such an entry there fails its check, saying so)."""
    if entry.get("row_hash") == ROW_HASH_VERSION:
        return row_hash_sql(select_star_columns(ch, table))
    return LEGACY_ROW_HASH


def verify_object(
    ch: ClickHouse,
    store: ObjectStore,
    table: str,
    key: str,
    entry: dict[str, Any],
    max_threads: int = 2,
    reading: str = "typed",
) -> dict[str, Any]:
    """Compare the object, as the engine reads it, with its manifest entry: as lines
    (``reading="lines"``, when the entry records them) or as rows parsed into the
    table's types (``"typed"``)."""
    if reading == "lines" and None not in (
        _count(entry, "lines"),
        _count(entry, "uncompressed_bytes"),
        _count(entry, "bytes"),
    ):
        return _verify_lines(ch, store, table, key, entry, max_threads)
    expected = entry.get("fingerprint")
    rows = _count(entry, "rows")
    if rows is None:
        return {"match": False, "expected": expected, "error": NO_RECORDED_SIZE}
    row_hash = entry_row_hash(ch, table, entry)
    sql = f"SELECT count(), sum(h) FROM (SELECT {row_hash} AS h FROM {{function}} LIMIT {{bound}})"
    found = _engine_read(
        ch, store, table, key, entry, "CSVWithNames", sql, (rows, "rows"), max_threads, expected
    )
    if isinstance(found, dict):
        return found
    count, checksum = found
    fingerprint = fingerprint_text(count, checksum)
    return {
        "rows": count,
        "fingerprint": fingerprint,
        "expected": expected,
        "match": fingerprint == expected,
        "read_by": "engine (typed)",
    }


def _verify_lines(
    ch: ClickHouse,
    store: ObjectStore,
    table: str,
    key: str,
    entry: dict[str, Any],
    max_threads: int,
) -> dict[str, Any]:
    """The object is the one uploaded (the store's ETag as the upload got it, asked
    for without reading the object; else sha256 and size, a bounded read of the
    compressed bytes), and the engine unpacks it (verifying zstd's content checksum
    as it goes) to the lines and bytes the export counted."""
    lines, raw = entry["lines"], entry["uncompressed_bytes"]
    expected = f"{lines} lines, {raw} bytes"
    try:
        uploaded = (
            store.etag(key) == entry["etag"]
            if entry.get("etag")
            else object_digest(store, key, entry["bytes"]) == (entry.get("sha256"), entry["bytes"])
        )
    except Exception as exc:  # missing, unreachable: named, never a crash
        return {"match": False, "expected": expected, "error": f"{key}: {short_error(exc)}"}
    if not uploaded:
        return {
            "match": False,
            "expected": expected,
            "error": f"{key} is not the object the backup wrote (ETag, or sha256 and size, differ)",
        }
    sql = "SELECT count(), sum(length(line)) FROM (SELECT line FROM {function} LIMIT {bound})"
    found = _engine_read(
        ch, store, table, key, entry, "LineAsString", sql, (lines, "lines"), max_threads, expected
    )
    if isinstance(found, dict):
        return found
    count, length = found
    found_text = f"{count} lines, {length + count} bytes"
    return {
        "lines": count,
        "found": found_text,
        "expected": expected,
        "match": found_text == expected,
        "read_by": "engine (lines)",
    }


def _engine_read(
    ch: ClickHouse,
    store: ObjectStore,
    table: str,
    key: str,
    entry: dict[str, Any],
    fmt: str,
    sql: str,
    recorded: tuple[int, str],
    max_threads: int,
    expected: Any,
) -> tuple[int, int] | dict[str, Any]:
    """``sql`` (with ``{function}``, the object read in ``fmt``, and ``{bound}``, one
    past the ``recorded`` count of rows or lines) run by the engine: its two numbers,
    or a failed result naming what was ``expected`` (an error, more than recorded),
    or, when the engine cannot reach the object, the scratch-table fallback's result."""
    bound, unit = recorded
    structure = LINES_STRUCTURE if fmt == "LineAsString" else table_structure(ch, table)
    source = object_source(ch, store, key, fmt, structure)
    if source is None:
        return {**restore_and_compare(ch, store, table, key, entry), "read_by": "scratch table"}
    function, params = source
    settings = f"max_threads = {int(max_threads)}"
    if function.startswith("url("):
        settings += f", {_URL_SETTINGS}"
    query = sql.format(function=function, bound="{bound:UInt64}") + f" SETTINGS {settings}"
    try:
        a, b = ch.query_rows(query, {**params, "bound": bound + 1})[0]
    except ClickHouseError as exc:
        if not ch.embedded and any(code in str(exc) for code in _UNREACHABLE):
            result = restore_and_compare(ch, store, table, key, entry)
            return {**result, "read_by": "scratch table (the server cannot read the object)"}
        return {"match": False, "expected": expected, "error": short_error(exc)}
    if int(a) > bound:
        error = f"{key} unpacks to more than the {bound} {unit} recorded"
        return {"match": False, "expected": expected, "error": error}
    return int(a), int(b or 0)


def restore_and_compare(
    ch: ClickHouse, store: ObjectStore, table: str, key: str, entry: dict[str, Any]
) -> dict[str, Any]:
    """The fallback: load the object into a scratch copy of ``table`` and fingerprint it.

    The object is unpacked up to the size recorded when it was written, no further: one
    that unpacks to more is not the backup (it may be a decompression bomb) and fails
    the comparison without being restored.
    """
    limit = _count(entry, "uncompressed_bytes")
    if limit is None:
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
        row_hash = entry_row_hash(ch, table, entry)
        rows, checksum = ch.query_rows(fingerprint_sql(scratch, row_hash))[0]
    except DecompressionLimitExceeded as exc:
        return {"match": False, "expected": entry["fingerprint"], "error": str(exc)}
    except ClickHouseError as exc:
        return {"match": False, "expected": entry.get("fingerprint"), "error": short_error(exc)}
    finally:
        ch.command(f"DROP TABLE IF EXISTS {scratch}")
    restored = fingerprint_text(rows, checksum)
    return {
        "rows": int(rows),
        "fingerprint": restored,
        "expected": entry["fingerprint"],
        "match": restored == entry["fingerprint"],
    }
