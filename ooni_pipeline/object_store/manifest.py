"""Manifest objects: JSON listing published objects (key -> entry), shared by the
backup manifests and the exports manifest.

Concurrent writers stay safe the same way everywhere: manifest objects are rewritten
only while holding a ClickHouse lock (``common.one_run_at_a_time``). Each backed-up
table owns its manifest, and readers merge them; the exports manifest is a tree of
them (``exports.manifest``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ooni_pipeline.object_store.stores import ObjectStore


def read_document(
    store: ObjectStore, key: str, what: str = "manifest"
) -> tuple[dict[str, Any] | None, bytes | None]:
    """(the JSON object stored at ``key``, its bytes), (None, None) if there is none;
    one request."""
    data = store.read_bytes_if_exists(key)
    if data is None:
        return None, None
    try:
        document = json.loads(data)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise ValueError(f"{store.address(key)} is not a {what}")
    return document, data


def read_manifest(
    store: ObjectStore, key: str, what: str = "manifest"
) -> dict[str, dict[str, Any]]:
    """The ``objects`` of the manifest at ``key`` ({} if there is none)."""
    manifest, _ = read_document(store, key, what)
    if manifest is None:
        return {}
    if not isinstance(manifest.get("objects"), dict):
        raise ValueError(f"{store.address(key)} is not a {what}")
    return manifest["objects"]


def write_document(store: ObjectStore, key: str, body: dict[str, Any]) -> dict[str, Any]:
    """Replace the JSON object at ``key`` (all or nothing, as every object write);
    returns the ``sha256`` and ``bytes`` of what was written."""
    data = json.dumps(body, indent=1, sort_keys=True).encode()
    store.put_bytes(key, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_manifest(
    store: ObjectStore, key: str, objects: dict[str, dict[str, Any]], **fields: Any
) -> dict[str, Any]:
    """Replace the manifest at ``key``; the ``sha256`` and ``bytes`` written."""
    return write_document(store, key, {"version": 1, **fields, "objects": objects})
