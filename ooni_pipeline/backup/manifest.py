"""The backup manifests: what was backed up, and the fingerprint it had.

One manifest per table, ``clickhouse_export/manifests/<table>.json``, written only by
that table's backup (one run at a time, see ``common.one_run_at_a_time``): backups of
different tables finishing together never rewrite each other's entries, which a
single shared file read, changed and rewritten did. ``load_manifest`` merges them on
read. The single ``clickhouse_export/manifest.json`` of earlier versions is still
read, for tables that have no manifest of their own yet.

Read at the start of a backup to skip unchanged chunks; updated after every object,
so a run that fails half-way still records what it did upload.
"""

from __future__ import annotations

from typing import Any

from ooni_pipeline.backup.plan import LEGACY_MANIFEST_KEY, MANIFESTS_PREFIX, manifest_key
from ooni_pipeline.object_store.manifest import read_manifest, write_manifest
from ooni_pipeline.object_store.stores import ObjectStore


def _read(store: ObjectStore, key: str) -> dict[str, dict[str, Any]]:
    return read_manifest(store, key, "backup manifest")


def load_manifest(store: ObjectStore, table: str | None = None) -> dict[str, dict[str, Any]]:
    """Object key -> entry, for ``table`` or for every table."""
    if table:
        own = _read(store, manifest_key(table))
        if own:
            return own
        legacy = _read(store, LEGACY_MANIFEST_KEY)
        return {k: v for k, v in legacy.items() if v.get("table") == table}
    objects = _read(store, LEGACY_MANIFEST_KEY)
    for key in store.list_keys(MANIFESTS_PREFIX):
        if key.endswith(".json"):
            objects.update(_read(store, key))
    return objects


def record_objects(store: ObjectStore, table: str, entries: dict[str, dict[str, Any]]) -> None:
    """Merge ``entries`` (object key -> entry) into ``table``'s manifest."""
    objects = load_manifest(store, table)
    objects.update(entries)
    write_manifest(store, manifest_key(table), objects, table=table)
