"""Manifest objects: JSON listing published objects (key -> entry), shared by the
backup manifests and the exports manifest.

Concurrent writers stay safe the same way everywhere: each writer owns its own
manifest object (a backed-up table, an exported asset), rewritten only while it
holds a ClickHouse lock (``common.one_run_at_a_time``), and readers merge them.
"""

from __future__ import annotations

import json
from typing import Any

from ooni_pipeline.object_store.stores import ObjectStore


def read_manifest(
    store: ObjectStore, key: str, what: str = "manifest"
) -> dict[str, dict[str, Any]]:
    """The ``objects`` of the manifest at ``key`` ({} if there is none)."""
    if not store.exists(key):
        return {}
    try:
        manifest = json.loads(store.read_bytes(key))
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("objects"), dict):
        raise ValueError(f"{store.address(key)} is not a {what}")
    return manifest["objects"]


def write_manifest(
    store: ObjectStore, key: str, objects: dict[str, dict[str, Any]], **fields: Any
) -> None:
    """Replace the manifest at ``key`` (all or nothing, as every object write)."""
    body = {"version": 1, **fields, "objects": objects}
    store.put_bytes(key, json.dumps(body, indent=1, sort_keys=True).encode())
