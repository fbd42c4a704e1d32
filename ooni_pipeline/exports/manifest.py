"""``exports/manifest.json``: every export object with its rows, bytes, sha256, the
source version it was built from and when it was written, so that a sync client
fetches only objects whose sha256 changed since its last sync.

Safe under concurrent writers the way the backup manifests are (see
``object_store.manifest``): each exported asset owns its manifest part,
``exports/manifests/<asset>.json``, and rewrites it, then ``exports/manifest.json``
from every part, only while holding the ClickHouse lock ``exports_manifest``. Runs
finishing together take turns, and the last one to write has read every part
written before it, so no entry is lost; a part is never written by two runs.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import dagster as dg

from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline.common import one_run_at_a_time
from ooni_pipeline.object_store import UploadResult
from ooni_pipeline.object_store.manifest import read_manifest, write_manifest
from ooni_pipeline.object_store.stores import ObjectStore

MANIFEST_KEY = "exports/manifest.json"
PARTS_PREFIX = "exports/manifests/"
LOCK_NAME = "exports_manifest"
WHAT = "exports manifest"


def part_key(asset_key: dg.AssetKey) -> str:
    return f"{PARTS_PREFIX}{asset_key.to_user_string()}.json"


def load_exports_manifest(store: ObjectStore) -> dict[str, dict[str, Any]]:
    """Object key -> entry, merged from every asset's part."""
    objects: dict[str, dict[str, Any]] = {}
    for key in store.list_keys(PARTS_PREFIX):
        if key.endswith(".json"):
            objects.update(read_manifest(store, key, WHAT))
    return objects


def manifest_disagreements(
    store: ObjectStore, asset_key: dg.AssetKey, recorded: dict[str, str]
) -> list[str]:
    """Where the asset's manifest entries differ from Dagster's record (object key ->
    sha256 recorded): a sync client trusts the manifest, so a stale entry (its write
    failed after the object was published) is a failure of the asset's check."""
    if not recorded:
        return []
    entries = read_manifest(store, part_key(asset_key), WHAT)
    problems = []
    for key, sha256 in recorded.items():
        listed = entries.get(key, {}).get("sha256")
        if listed != sha256:
            found = f"sha256 {listed[:12]}…" if isinstance(listed, str) else "no entry"
            problems.append(
                f"{key}: the manifest has {found}, Dagster recorded sha256 {sha256[:12]}…"
            )
    return problems


def manifest_entry(
    written: Any, asset_key: dg.AssetKey, partition: str, source_version: str
) -> dict[str, Any]:
    """The manifest's entry of one ``publish.Written`` object."""
    return upload_entry(
        written.upload, written.rows, written.format, asset_key, partition, source_version
    )


def upload_entry(
    upload: UploadResult,
    rows: int,
    fmt: str,
    asset_key: dg.AssetKey,
    partition: str,
    source_version: str,
) -> dict[str, Any]:
    """The manifest's entry of an object written by ``stream_upload`` (website_metrics)."""
    entry = {
        "key": upload.key,
        "format": fmt,
        "rows": rows,
        "bytes": upload.bytes,
        "uncompressed_bytes": upload.raw_bytes,
        "sha256": upload.sha256,
    }
    return {
        **entry,
        "asset": asset_key.to_user_string(),
        "partition": partition,
        "source_version": source_version,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def record_exports(
    context: dg.AssetExecutionContext,
    ch: ClickHouse,
    store: ObjectStore,
    entries: dict[dg.AssetKey, dict[str, dict[str, Any]]],
) -> None:
    """Merge each asset's ``entries`` (object key -> entry) into its part, then
    rewrite ``exports/manifest.json`` from all parts (once, however many assets)."""
    entries = {key: objects for key, objects in entries.items() if objects}
    if not entries:
        return
    with one_run_at_a_time(context, ch, LOCK_NAME):
        for asset_key, objects in entries.items():
            own = read_manifest(store, part_key(asset_key), WHAT)
            own.update(objects)
            write_manifest(store, part_key(asset_key), own, asset=asset_key.to_user_string())
        write_manifest(
            store,
            MANIFEST_KEY,
            load_exports_manifest(store),
            written_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
