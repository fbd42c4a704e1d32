"""``backup/<table>`` assets: ClickHouse tables streamed to the object store as zstd CSV."""

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import dagster as dg
from pydantic import Field

from ooni_pipeline.backup.export import export_chunk, progress_logger
from ooni_pipeline.backup.manifest import load_manifest, record_objects
from ooni_pipeline.backup.parts import (
    PartsState,
    RowsByPart,
    TableParts,
    blocks_record,
    decide_from_parts,
    inside_snapshot,
    parts_state,
    rows_by_part,
)
from ooni_pipeline.backup.plan import (
    OBJECT_PREFIX,
    ROW_HASH_VERSION,
    BackupTable,
    Chunk,
    Content,
    Source,
    fingerprint,
    manifest_key,
    table_source,
)
from ooni_pipeline.backup.verify import verify_object
from ooni_pipeline.clickhouse import ClickHouse, ClickHouseResource
from ooni_pipeline.clickhouse.schema import KNOWN_TABLES, ensure_tables
from ooni_pipeline.common import (
    CLICKHOUSE_POOL,
    OWNER,
    one_run_at_a_time,
    raise_refusals,
    shrink_refusal,
)
from ooni_pipeline.object_store import ObjectStoreResource, UploadResult
from ooni_pipeline.object_store.stores import ObjectStore

MB = 1024 * 1024


class BackupConfig(dg.Config):
    pause_between_chunks_s: float = Field(
        default=5.0,
        ge=0,
        description="the longest pause between chunks on a ClickHouse server, taken only while other "
        "queries are running there, so its query queue stays short; never on the embedded database",
    )
    pause_fraction: float = Field(
        default=0.5,
        ge=0,
        description="a pause on a busy server lasts this fraction of the last chunk's export time "
        "(capped by pause_between_chunks_s): a duty cycle that yields in proportion to the load put on it",
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


class ChunkChangedError(RuntimeError):
    """The rows exported are not the rows fingerprinted (changed meanwhile, or lost
    on the way): the object is not what the fingerprint describes."""


@dataclass(frozen=True)
class Reading:
    """A chunk read before its export: the instant it is read as of, its fingerprint,
    its parts read before them, and its physical rows by part (for the manifest's
    ``blocks``; None where the table allows no such record, see ``parts``)."""

    snapshot: Source
    content: Content
    parts: PartsState | None
    rows: RowsByPart | None


def read_chunk(
    ch: ClickHouse,
    chunk: Chunk,
    source: Source,
    lag_s: float,
    parts: PartsState | None,
    rows: RowsByPart | None = None,
) -> Reading:
    """Fingerprint the chunk as of ``lag_s`` ago, ``parts`` having been read first
    (and ``rows``, if given, counted after them)."""
    snapshot = source.at_now(ch, lag_s)
    content = fingerprint(ch, chunk, snapshot)
    if parts is None or not parts.table:
        rows = None
    elif rows is None:
        rows = rows_by_part(ch, chunk, source.snapshot_column)
    return Reading(snapshot, content, parts, rows)


@dataclass(frozen=True)
class BackedUp:
    """A chunk's object as written, and what the manifest records of it."""

    upload: UploadResult
    content: Content
    parts: PartsState | None  # may stand for the content (see ``back_up_chunk``)
    blocks: dict[str, Any] | None  # the manifest's ``blocks`` (see ``parts``)


@dataclass
class _ExportCheck:
    """What an attempt's object must be, decided before its upload completes: a
    failure aborts the upload, and the last good object stays under the key."""

    ch: ClickHouse
    chunk: Chunk
    snapshot: Source
    content: Content
    before: PartsState | None
    unchanged: bool = False

    def verify(self, lines: int) -> None:
        """``lines``: those the export sent. The chunk's parts unchanged since before
        the fingerprint settle it; otherwise it is fingerprinted again."""
        self.unchanged = self.before is not None and parts_state(self.ch, self.chunk) == self.before
        expected = self.content.object_lines
        if lines != expected or (
            not self.unchanged and fingerprint(self.ch, self.chunk, self.snapshot) != self.content
        ):
            raise ChunkChangedError(
                f"{self.chunk.label} changed while it was exported, or rows were lost on the way "
                f"(fingerprint {self.content.fingerprint}; {expected} lines expected, {lines} "
                "exported); not uploaded, the previous object is kept"
            )


def back_up_chunk(
    ch: ClickHouse,
    store: ObjectStore,
    chunk: Chunk,
    source: Source,
    config: BackupConfig,
    log,
    known: Reading | None = None,
) -> BackedUp:
    """Upload one chunk, retrying on its own.

    Each attempt reads the chunk as of one instant (``known``: the reading already
    taken, for the first) and, before the upload
    completes (a failed attempt never replaces the previous object), makes sure the
    object holds exactly the fingerprinted rows: as many lines as they make
    (``export``), and the chunk's parts unchanged since before the fingerprint
    (parts are immutable), which settles it at the cost of a look at
    ``system.parts``; when they changed (an insert, a merge), the chunk is
    fingerprinted again and must match (rows inserted meanwhile are after the
    snapshot; a merge or an insert into a table without an insertion time changes
    it, and the attempt is retried). ``parts`` is returned when it may stand for the
    chunk's content in the manifest: unchanged, and every row inside the snapshot;
    ``blocks`` likewise (the rows it counts were counted between the parts read
    before and after the export).
    """
    for attempt in range(1, config.chunk_attempts + 1):
        try:
            reading = (
                known
                if known and attempt == 1
                else read_chunk(ch, chunk, source, config.snapshot_lag_s, parts_state(ch, chunk))
            )
            before, snapshot = reading.parts, reading.snapshot
            checked = _ExportCheck(ch, chunk, snapshot, reading.content, before)
            upload = export_chunk(
                ch,
                store,
                chunk,
                snapshot,
                config.max_threads,
                checked.verify,
                progress_logger(chunk.label, log),
            )
            unchanged = checked.unchanged
            settled = before if unchanged and inside_snapshot(ch, chunk, before, snapshot) else None
            blocks = (
                blocks_record(settled, reading.rows, snapshot.snapshot_time)
                if settled and reading.rows
                else None
            )
            return BackedUp(upload, reading.content, settled, blocks)
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


def pause_s(ch: ClickHouse, config: BackupConfig, last_export_s: float) -> float:
    """How long to pause before the next chunk: on a server, while other queries run
    there, ``pause_fraction`` of the last export (at most ``pause_between_chunks_s``);
    on the embedded database nobody else can be queuing, so never."""
    if ch.embedded or config.pause_fraction <= 0 or config.pause_between_chunks_s <= 0:
        return 0.0
    others = ch.scalar("SELECT count() FROM system.processes WHERE query_id != queryID()")
    if not others:
        return 0.0
    return min(config.pause_between_chunks_s, config.pause_fraction * last_export_s)


class RestoreCheckConfig(dg.Config):
    older_objects_per_run: int = Field(
        default=2,
        ge=0,
        description="besides the objects the last backup wrote, how many older objects each check "
        "verifies, in rotation, so every object is verified again in time at a bounded cost per run",
    )
    max_threads: int = Field(
        default=4,
        ge=1,
        description="ClickHouse threads per object read: reading, unpacking and parsing form a "
        "pipeline that leaves cores idle at one thread per core (measured: 4 threads on 2 cores "
        "read a month 1.6x faster than 2)",
    )


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
            "upload, with no temporary file. Chunks whose parts (``system.parts``), or else content fingerprint (row "
            "count and checksum of the deduplicated rows), match the table's manifest "
            "(``clickhouse_export/manifests/<table>.json``) are skipped; on a ClickHouse server busy with other "
            "queries, a pause between chunks keeps its queue short. A failed upload is aborted: no partial "
            "object is ever visible."
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
        skipped = rows_total = bytes_total = raw_total = fingerprinted = 0
        refusals: list[str] = []
        refreshed: dict[str, dict[str, Any]] = {}
        # Fingerprinted unchanged, their parts to be recorded if still the same at the end.
        to_refresh: list[tuple[Chunk, PartsState, dict[str, Any]]] = []
        last_export_s = 0.0
        with clickhouse.connect() as ch, one_run_at_a_time(context, ch, f"backup_{spec.table}"):
            if spec.table in KNOWN_TABLES:
                ensure_tables(ch, spec.table)
            table_parts = TableParts(ch, spec)
            present = set(store.list_keys(f"{OBJECT_PREFIX}{spec.table}"))
            # Only a fingerprint made with today's row hash may be kept without one: an
            # entry of an older hash is fingerprinted again once (and exported if its
            # fingerprint differs), so the restore check can read its object back.
            current = {k: e for k, e in manifest.items() if e.get("row_hash") == ROW_HASH_VERSION}
            decided = decide_from_parts(ch, table_parts, current, present, config.force)
            chunks, by_parts, after_merges = decided.chunks, decided.by_parts, decided.after_merges
            context.log.info(f"{spec.table}: {len(chunks)} chunk(s) with rows")
            refreshed.update(after_merges)
            source: Source | None = None  # read once a chunk needs reading
            for number, chunk in enumerate(chunks, start=1):
                known = None
                if chunk.key in by_parts or chunk.key in after_merges:
                    skipped += 1
                    why = (
                        "parts unchanged"
                        if chunk.key in by_parts
                        else "parts moved by merges only, rows unchanged"
                    )
                    context.log.info(f"[{number}/{len(chunks)}] {chunk.label}: {why}, skipped")
                    continue
                source = source or table_source(ch, spec.table)
                if not config.force:
                    previous = manifest.get(chunk.key, {})
                    state = table_parts.state(chunk)
                    stored = chunk.key in present
                    known = read_chunk(
                        ch,
                        chunk,
                        source,
                        config.snapshot_lag_s,
                        state,
                        decided.rows.get(chunk.key),
                    )
                    fingerprinted += 1
                    rows = known.content.rows
                    if previous.get("fingerprint") == known.content.fingerprint and stored:
                        skipped += 1
                        context.log.info(
                            f"[{number}/{len(chunks)}] {chunk.label}: unchanged ({rows} rows), skipped"
                        )
                        if state and inside_snapshot(ch, chunk, state, known.snapshot):
                            entry = {
                                **previous,
                                "parts": state.signature,
                                "row_hash": ROW_HASH_VERSION,
                            }
                            blocks = (
                                blocks_record(state, known.rows, known.snapshot.snapshot_time)
                                if known.rows
                                else None
                            )
                            to_refresh.append(
                                (chunk, state, {**entry, "blocks": blocks} if blocks else entry)
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
                    pause = pause_s(ch, config, last_export_s)
                    if pause:
                        context.log.info(f"other queries running: pausing {pause:.1f} s")
                        time.sleep(pause)
                began = time.monotonic()
                done = back_up_chunk(ch, store, chunk, source, config, context.log, known)
                last_export_s = time.monotonic() - began
                upload, rows = done.upload, done.content.rows
                entry = {
                    "table": spec.table,
                    "chunk": chunk.month or "all",
                    "rows": rows,
                    "bytes": upload.bytes,
                    "uncompressed_bytes": upload.raw_bytes,
                    "sha256": upload.sha256,
                    "fingerprint": done.content.fingerprint,
                    "row_hash": ROW_HASH_VERSION,
                    "lines": done.content.object_lines,
                    "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                if upload.etag:
                    entry["etag"] = upload.etag
                if done.parts:
                    entry["parts"] = done.parts.signature
                if done.blocks:
                    entry["blocks"] = done.blocks
                record_objects(store, spec.table, {chunk.key: entry})
                written.append(chunk.key)
                rows_total += rows
                bytes_total += upload.bytes
                raw_total += upload.raw_bytes
                context.log.info(
                    f"[{number}/{len(chunks)}] {chunk.label}: {rows} rows, {upload.raw_bytes / MB:.1f} MB CSV -> "
                    f"{upload.bytes / MB:.1f} MB zstd in {upload.duration_s:.1f} s "
                    f"({upload.raw_bytes / MB / max(upload.duration_s, 1e-6):.1f} MB/s) -> {upload.address}"
                )
            if to_refresh:  # the parts read, counted and fingerprinted are still the chunk's
                now = TableParts(ch, spec)
                refreshed.update({c.key: e for c, state, e in to_refresh if now.state(c) == state})
            if refreshed:
                record_objects(store, spec.table, refreshed)
        raise_refusals(refusals)
        return dg.MaterializeResult(
            metadata={
                "objects_written": len(written),
                "objects_skipped": skipped,
                "objects_skipped_by_parts": len(by_parts),
                "objects_skipped_after_merges": len(after_merges),
                "objects_fingerprinted": fingerprinted,
                "dagster/row_count": rows_total,
                "bytes": bytes_total,
                "uncompressed_bytes": raw_total,
                "duration_s": round(time.monotonic() - start, 3),
                "written_keys": dg.MetadataValue.json(written),
                "manifest": store.address(manifest_key(spec.table)),
            }
        )

    check_key = dg.AssetCheckKey(key, "restore_check")

    @dg.asset_check(
        asset=key,
        name="restore_check",
        pool=CLICKHOUSE_POOL,
        description="ClickHouse reads objects of the backup where they lie and compares them with what the "
        "backup recorded: the objects the last backup wrote as lines (sha256 and size as uploaded, then "
        "unpacked by the engine, zstd's content checksum verified, to the lines and bytes the export "
        "counted against the fingerprinted rows), plus a rotating sample of older ones "
        "(older_objects_per_run) parsed into the table's types (row count and checksum against the "
        "fingerprint: they still restore into the table as it is). No scratch table, no temporary file; "
        "reading stops one line or row past the recorded count.",
    )
    def _check(
        context: dg.AssetCheckExecutionContext,
        config: RestoreCheckConfig,
        clickhouse: ClickHouseResource,
        object_store: ObjectStoreResource,
    ) -> dg.AssetCheckResult:
        store = object_store.get_store()
        entries = load_manifest(store, spec.table)
        event = context.instance.get_latest_materialization_event(key)
        just_written: list[str] = []
        if event and event.asset_materialization:
            value = event.asset_materialization.metadata.get("written_keys")
            just_written = [k for k in (getattr(value, "value", None) or []) if k in entries]
        older = sorted(k for k in entries if k not in just_written)
        start = _sample_start(context.instance, check_key) % len(older) if older else 0
        count = min(config.older_objects_per_run, len(older))
        sample = [older[(start + i) % len(older)] for i in range(count)]
        results = {}
        with clickhouse.connect() as ch:
            for object_key, reading in [(k, "lines") for k in just_written] + [
                (k, "typed") for k in sample
            ]:
                results[object_key] = verify_object(
                    ch,
                    store,
                    spec.table,
                    object_key,
                    entries[object_key],
                    config.max_threads,
                    reading,
                )
        failed = {k: r for k, r in results.items() if not r["match"]}
        return dg.AssetCheckResult(
            passed=bool(results) and not failed,
            metadata={
                "objects_checked": len(results),
                "objects_just_written": len(just_written),
                "older_objects_sampled": dg.MetadataValue.json(sample),
                "bound": f"the objects the last backup wrote + {config.older_objects_per_run} older "
                f"object(s) per run, in rotation, of {len(entries)} in the manifest",
                "next_sample_start": (start + count) % len(older) if older else 0,
                "results": dg.MetadataValue.json(results),
            },
        )

    return _asset, _check


def _sample_start(instance: dg.DagsterInstance, check_key: dg.AssetCheckKey) -> int:
    """Where the previous check's rotation stopped (its ``next_sample_start``)."""
    for record in instance.event_log_storage.get_asset_check_execution_history(check_key, limit=5):
        metadata = getattr(record.evaluation, "metadata", None) or {}
        if "next_sample_start" in metadata:  # a planned check has no metadata yet
            return int(metadata["next_sample_start"].value)
    return 0
