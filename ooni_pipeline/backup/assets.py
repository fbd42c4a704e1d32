"""``backup/<table>`` assets: ClickHouse tables streamed to the object store as zstd CSV."""

import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import dagster as dg
from pydantic import Field

from ooni_pipeline.backup.manifest import load_manifest, record_objects
from ooni_pipeline.backup.plan import (
    BackupTable,
    Chunk,
    Source,
    fingerprint,
    fingerprint_sql,
    list_chunks,
    manifest_key,
    select_sql,
    table_source,
)
from ooni_pipeline.clickhouse import ClickHouse, ClickHouseResource, quote_identifier
from ooni_pipeline.clickhouse.schema import KNOWN_TABLES, ensure_tables
from ooni_pipeline.common import (
    CLICKHOUSE_POOL,
    OWNER,
    one_run_at_a_time,
    raise_refusals,
    shrink_refusal,
)
from ooni_pipeline.decompression import DecompressionLimitExceeded, iter_bounded
from ooni_pipeline.object_store import ObjectStoreResource, UploadResult, stream_upload
from ooni_pipeline.object_store.stores import ObjectStore

MB = 1024 * 1024
NO_RECORDED_SIZE = "the manifest records no uncompressed_bytes to bound the restore with"


class BackupConfig(dg.Config):
    pause_between_chunks_s: float = Field(
        default=5.0, description="sleep between chunks, so the database's query queue stays short"
    )
    chunk_attempts: int = Field(default=3, ge=1, description="tries per chunk before the run fails")
    max_threads: int = Field(default=2, ge=1, description="ClickHouse threads per export query")
    force: bool = Field(
        default=False,
        description="upload every chunk, even unchanged ones, and even one under half the "
        "rows of its last backup (refused otherwise)",
    )
    snapshot_lag_s: float = Field(
        default=60.0,
        ge=0,
        description="tables with an insertion-time column (fastpath.update_time) are backed up as of "
        "this many seconds ago, so inserts still being written are left for the next backup",
    )


def csv_header(columns: list[str]) -> bytes:
    """A CSVWithNames header line, quoted as ClickHouse writes it."""
    return (",".join('"' + c.replace('"', '""') + '"' for c in columns) + "\n").encode()


def _export(
    ch: ClickHouse, store: ObjectStore, chunk: Chunk, source: Source, max_threads: int, log
) -> UploadResult:
    sql, params = select_sql(chunk, source, max_threads)
    header = csv_header(ch.header(f"SELECT * FROM {quote_identifier(chunk.spec.table)}"))
    last_log = [time.monotonic()]
    start = time.monotonic()

    def progress(raw: int, written: int) -> None:
        now = time.monotonic()
        if now - last_log[0] >= 10:
            last_log[0] = now
            log.info(
                f"{chunk.label}: {raw / MB:.0f} MB read, {written / MB:.0f} MB written, {raw / MB / (now - start):.1f} MB/s"
            )

    def body() -> Iterator[bytes]:
        yield header
        yield from ch.stream(sql, params, fmt="CSV")

    return stream_upload(store, chunk.key, body(), "zstd", progress=progress)


class ChunkChangedError(RuntimeError):
    """The chunk's rows changed while it was exported: the object is not what the
    fingerprint describes."""


def back_up_chunk(
    ch: ClickHouse,
    store: ObjectStore,
    chunk: Chunk,
    source: Source,
    config: BackupConfig,
    log,
    known: tuple[Source, tuple[int, str]] | None = None,
) -> tuple[UploadResult, int, str]:
    """Upload one chunk, retrying on its own; returns (upload, rows, fingerprint).

    Each attempt reads the chunk as of one instant (``known``: the snapshot and
    fingerprint already taken, for the first) and fingerprints it again after the
    export: equal fingerprints mean the object holds exactly the fingerprinted rows
    (rows inserted meanwhile are after the snapshot; a merge or an insert into a
    table without an insertion time changes the second one, and the attempt is
    retried).
    """
    for attempt in range(1, config.chunk_attempts + 1):
        try:
            if known and attempt == 1:
                snapshot, (rows, fp) = known
            else:
                snapshot = source.at_now(ch, config.snapshot_lag_s)
                rows, fp = fingerprint(ch, chunk, snapshot)
            upload = _export(ch, store, chunk, snapshot, config.max_threads, log)
            if fingerprint(ch, chunk, snapshot)[1] != fp:
                raise ChunkChangedError(
                    f"{chunk.label} changed while it was exported (fingerprint {fp} before)"
                )
            return upload, rows, fp
        except Exception as exc:
            if attempt == config.chunk_attempts:
                raise RuntimeError(
                    f"backing up {chunk.label} to {chunk.key} failed after {attempt} attempts: {exc}"
                ) from exc
            delay = min(60.0, 2.0**attempt)
            log.warning(
                f"{chunk.label}: attempt {attempt} failed ({exc}); retrying in {delay:.0f} s"
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


# Tables written by an asset of the same key: a backup depends on it in the lineage.
TABLES_WITH_AN_ASSET = frozenset(
    ("fastpath", "citizenlab", "fingerprints_dns", "fingerprints_http", "asnmeta")
)


def build_backup_asset(spec: BackupTable) -> tuple[dg.AssetsDefinition, dg.AssetChecksDefinition]:
    key = dg.AssetKey(["backup", spec.table])
    how = f"one object per month of ``{spec.month_column}``" if spec.month_column else "one object"

    @dg.asset(
        key=key,
        group_name="backup",
        deps=[spec.table] if spec.table in TABLES_WITH_AN_ASSET else [],
        kinds={"clickhouse", "s3", "csv"},
        owners=[OWNER],
        pool=CLICKHOUSE_POOL,
        description=(
            f"Backup and public export of the ClickHouse table ``{spec.table}``: zstd-compressed CSVWithNames "
            f"under ``clickhouse_export/csv/`` ({how}), streamed from ClickHouse through zstd into a multipart "
            "upload, with no temporary file. Chunks whose content fingerprint (row count and checksum of the "
            "deduplicated rows) matches the table's manifest (``clickhouse_export/manifests/<table>.json``) are skipped; a pause between chunks "
            "keeps the database's queue short. A failed upload is aborted: no partial object is ever visible."
        ),
    )
    def _asset(
        context: dg.AssetExecutionContext,
        config: BackupConfig,
        clickhouse: ClickHouseResource,
        object_store: ObjectStoreResource,
    ) -> dg.MaterializeResult:
        store = object_store.get_store()
        manifest = load_manifest(store, spec.table)
        start = time.monotonic()
        written: list[str] = []
        skipped = rows_total = bytes_total = raw_total = 0
        refusals: list[str] = []
        with clickhouse.connect() as ch, one_run_at_a_time(context, ch, f"backup_{spec.table}"):
            if spec.table in KNOWN_TABLES:
                ensure_tables(ch, spec.table)
            source = table_source(ch, spec.table)
            chunks = list_chunks(ch, spec)
            context.log.info(f"{spec.table}: {len(chunks)} chunk(s) with rows")
            for number, chunk in enumerate(chunks, start=1):
                known = None
                if not config.force:
                    snapshot = source.at_now(ch, config.snapshot_lag_s)
                    rows, fp = fingerprint(ch, chunk, snapshot)
                    known = (snapshot, (rows, fp))
                    previous = manifest.get(chunk.key, {})
                    if previous.get("fingerprint") == fp and store.exists(chunk.key):
                        skipped += 1
                        context.log.info(
                            f"[{number}/{len(chunks)}] {chunk.label}: unchanged ({rows} rows), skipped"
                        )
                        continue
                    refusal = shrink_refusal(
                        f"{chunk.label} ({chunk.key})", previous.get("rows"), rows
                    )
                    if refusal:
                        refusals.append(refusal)
                        context.log.error(f"[{number}/{len(chunks)}] {refusal}; not uploaded")
                        continue
                if written:
                    time.sleep(config.pause_between_chunks_s)
                upload, rows, fp = back_up_chunk(
                    ch, store, chunk, source, config, context.log, known
                )
                record_objects(
                    store,
                    spec.table,
                    {
                        chunk.key: {
                            "table": spec.table,
                            "chunk": chunk.month or "all",
                            "rows": rows,
                            "bytes": upload.bytes,
                            "uncompressed_bytes": upload.raw_bytes,
                            "sha256": upload.sha256,
                            "fingerprint": fp,
                            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        }
                    },
                )
                written.append(chunk.key)
                rows_total += rows
                bytes_total += upload.bytes
                raw_total += upload.raw_bytes
                context.log.info(
                    f"[{number}/{len(chunks)}] {chunk.label}: {rows} rows, {upload.raw_bytes / MB:.1f} MB CSV -> "
                    f"{upload.bytes / MB:.1f} MB zstd in {upload.duration_s:.1f} s "
                    f"({upload.raw_bytes / MB / max(upload.duration_s, 1e-6):.1f} MB/s) -> {upload.address}"
                )
        raise_refusals(refusals)
        return dg.MaterializeResult(
            metadata={
                "objects_written": len(written),
                "objects_skipped": skipped,
                "dagster/row_count": rows_total,
                "bytes": bytes_total,
                "uncompressed_bytes": raw_total,
                "duration_s": round(time.monotonic() - start, 3),
                "written_keys": dg.MetadataValue.json(written),
                "manifest": store.address(manifest_key(spec.table)),
            }
        )

    @dg.asset_check(
        asset=key,
        name="restore_check",
        pool=CLICKHOUSE_POOL,
        description="Reads the objects of the last backup (or the newest one) back into a scratch table and "
        "compares row count and checksum with the fingerprint recorded at backup time. An object "
        "that unpacks past the size recorded in the manifest fails without being restored.",
    )
    def _check(
        context: dg.AssetCheckExecutionContext,
        clickhouse: ClickHouseResource,
        object_store: ObjectStoreResource,
    ) -> dg.AssetCheckResult:
        store = object_store.get_store()
        entries = load_manifest(store, spec.table)
        event = context.instance.get_latest_materialization_event(key)
        keys = []
        if event and event.asset_materialization:
            value = event.asset_materialization.metadata.get("written_keys")
            keys = [k for k in (getattr(value, "value", None) or []) if k in entries]
        if not keys and entries:
            keys = [max(entries, key=lambda k: entries[k]["time"])]
        results = {}
        with clickhouse.connect() as ch:
            for object_key in keys:
                results[object_key] = restore_and_compare(
                    ch, store, spec.table, object_key, entries[object_key]
                )
        failed = {k: r for k, r in results.items() if not r["match"]}
        return dg.AssetCheckResult(
            passed=bool(results) and not failed,
            metadata={"objects_checked": len(results), "results": dg.MetadataValue.json(results)},
        )

    return _asset, _check


def restore_and_compare(
    ch: ClickHouse, store: ObjectStore, table: str, key: str, entry: dict[str, Any]
) -> dict[str, Any]:
    """Load an object into a scratch copy of ``table``; compare it with the manifest entry.

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
    finally:
        ch.command(f"DROP TABLE IF EXISTS {scratch}")
    restored = f"{int(rows)}:{int(checksum):016x}"
    return {
        "rows": int(rows),
        "fingerprint": restored,
        "expected": entry["fingerprint"],
        "match": restored == entry["fingerprint"],
    }
