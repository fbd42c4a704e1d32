"""``clickhouse_export/manifest.json``: what was backed up, and the fingerprint it had.

Read at the start of a backup to skip unchanged chunks; updated after every object,
so a run that fails half-way still records what it did upload.
"""

from __future__ import annotations

import json
from typing import Any

from ooni_pipeline.backup.plan import MANIFEST_KEY
from ooni_pipeline.object_store.stores import ObjectStore


def load_manifest(store: ObjectStore) -> dict[str, Any]:
    if not store.exists(MANIFEST_KEY):
        return {"version": 1, "objects": {}}
    manifest = json.loads(store.read_bytes(MANIFEST_KEY))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("objects"), dict):
        raise ValueError(f"{store.address(MANIFEST_KEY)} is not a backup manifest")
    return manifest


def record_objects(store: ObjectStore, entries: dict[str, dict[str, Any]]) -> None:
    """Merge ``entries`` (key -> entry) into the manifest, re-read just before writing
    so concurrent backups of other tables keep theirs."""
    manifest = load_manifest(store)
    manifest["objects"].update(entries)
    store.put_bytes(MANIFEST_KEY, json.dumps(manifest, indent=1, sort_keys=True).encode())
