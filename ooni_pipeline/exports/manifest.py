"""``exports/manifest.json``: every export object with its rows, bytes, sha256, the
source version it was built from and when it was written, so that a sync client
fetches only objects whose sha256 changed since its last sync.

A tree of small JSON objects, so that recording one partition costs the same after
ten years as after one day (docs/consumers.md, "Only what changed"):

- ``exports/manifest.json``, the index: ``{"version": 2, "parts": {<asset index key>:
  {asset, sha256, bytes, objects, written_at}}}``, one line per exported asset;
- ``exports/manifests/<asset>.json``, an asset's index: ``{"version": 2, "asset",
  "parts": {<shard key>: {month, sha256, bytes, objects, written_at}}}``, one line per
  month;
- ``exports/manifests/<asset>/<YYYY-MM>.json``, a shard: ``{"version": 2, "asset",
  "month", "objects": {<object key>: entry}}``, the entries of that month's partitions.

Each level lists the sha256 of the object below as written, so a client follows only
what changed, and a check can prove the chain. Recording a partition reads and
writes its shard, its asset's index and the index: 3 reads and 3 writes, of its
month's entries, a line per month of the asset and a line per asset; other assets'
entries and the asset's other months are never read.

Safe under concurrent writers the way the backup manifests are (see
``object_store.manifest``): everything is written only while holding the ClickHouse
lock ``exports_manifest``, so runs finishing together take turns and each reads what
the one before it wrote; writes go bottom-up (shard, asset index, index), so a
failure part-way leaves every level describing objects that exist. Before writing, a
recording names the shards it is about to write in ``state/exports_manifest_pending.json``,
and empties it when the index is written: the next recording, of any asset or month,
finds a failed one's shards there and lists them again as they are, so no level is
left behind for longer than one recording (until then the asset's check of those
months reports it).

The single-level layout of earlier versions (``exports/manifest.json`` with every
entry under ``objects``, ``exports/manifests/<asset>.json`` likewise) is converted,
once, by the first recording that finds it.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

import dagster as dg

from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline.common import one_run_at_a_time
from ooni_pipeline.object_store import UploadResult
from ooni_pipeline.object_store.manifest import read_document, write_document
from ooni_pipeline.object_store.stores import ObjectStore

MANIFEST_KEY = "exports/manifest.json"
# Internal state, outside the public exports/ prefix.
PENDING_KEY = "state/exports_manifest_pending.json"
PARTS_PREFIX = "exports/manifests/"
LOCK_NAME = "exports_manifest"
WHAT = "exports manifest"
VERSION = 2

Entries = dict[str, dict[str, Any]]


def asset_index_key(asset_key: dg.AssetKey) -> str:
    return f"{PARTS_PREFIX}{asset_key.to_user_string()}.json"


def shard_key(asset_key: dg.AssetKey, month: str) -> str:
    return f"{PARTS_PREFIX}{asset_key.to_user_string()}/{month}.json"


def shard_month(partition: str) -> str:
    """The month (``YYYY-MM``) whose shard holds a day's or a month's entries."""
    if not re.match(r"\d{4}-\d{2}(-\d{2})?$", partition or ""):
        raise ValueError(f"no manifest shard for partition {partition!r}: not a day or a month")
    return partition[:7]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(store: ObjectStore, key: str) -> tuple[dict[str, Any] | None, bytes | None]:
    return read_document(store, key, WHAT)


def _is_index(document: dict[str, Any] | None) -> bool:
    return (
        document is not None
        and document.get("version") == VERSION
        and isinstance(document.get("parts"), dict)
    )


def _objects(store: ObjectStore, key: str, document: dict[str, Any]) -> Entries:
    if not isinstance(document.get("objects"), dict):
        raise ValueError(f"{store.address(key)} is not an {WHAT}")
    return document["objects"]


# -- writing ------------------------------------------------------------------------


def _write_shards(
    store: ObjectStore, asset: str, shards: dict[str, Any], objects: Entries, merge: bool
) -> None:
    """Write ``objects`` into their months' shards of ``asset`` (merged with what the
    shard holds if ``merge``) and update ``shards``, the asset index's lines."""
    asset_key = dg.AssetKey.from_user_string(asset)
    by_month: dict[str, Entries] = defaultdict(dict)
    for key, entry in objects.items():
        by_month[shard_month(str(entry.get("partition")))][key] = entry
    for month, new in sorted(by_month.items()):
        key = shard_key(asset_key, month)
        own: Entries = {}
        if merge:
            document, _ = _read(store, key)
            own = _objects(store, key, document) if document is not None else {}
        own.update(new)
        body = {"version": VERSION, "asset": asset, "month": month, "objects": own}
        shards[key] = {
            **write_document(store, key, body),
            "month": month,
            "objects": len(own),
            "written_at": _now(),
        }


def _write_asset_index(store: ObjectStore, asset: str, shards: dict[str, Any]) -> dict[str, Any]:
    """Write the asset's index; its line in ``exports/manifest.json``."""
    key = asset_index_key(dg.AssetKey.from_user_string(asset))
    written = write_document(store, key, {"version": VERSION, "asset": asset, "parts": shards})
    return {
        **written,
        "asset": asset,
        "objects": sum(line["objects"] for line in shards.values()),
        "written_at": _now(),
    }


def _relisted(store: ObjectStore, asset: str, shards: dict[str, Any], months: set[str]) -> None:
    """List the asset's shards of ``months`` in ``shards`` as they are now (a recording
    that failed after writing them left their lines behind)."""
    asset_key = dg.AssetKey.from_user_string(asset)
    for month in sorted(months):
        key = shard_key(asset_key, month)
        document, data = _read(store, key)
        if document is not None and data is not None:
            shards[key] = {
                "sha256": _sha256(data),
                "bytes": len(data),
                "month": month,
                "objects": len(_objects(store, key, document)),
                "written_at": _now(),
            }


def _record_asset(
    store: ObjectStore, asset_key: dg.AssetKey, objects: Entries, relist: set[str]
) -> dict[str, Any]:
    """Merge ``objects`` into the asset's shards, list its shards of the months
    ``relist`` as they are, then write its index (bottom-up)."""
    asset = asset_key.to_user_string()
    key = asset_index_key(asset_key)
    document, _ = _read(store, key)
    if document is None or _is_index(document):
        shards = dict(document["parts"]) if document is not None else {}
        _relisted(store, asset, shards, relist)
        _write_shards(store, asset, shards, objects, merge=True)
    else:  # a part of the single-level layout: all its entries, into shards
        shards = {}
        _write_shards(store, asset, shards, {**_objects(store, key, document), **objects}, False)
    return _write_asset_index(store, asset, shards)


def _converted_index(store: ObjectStore) -> dict[str, Any]:
    """The index's lines when ``exports/manifest.json`` is not one (absent, or of the
    single-level layout): every asset index under ``exports/manifests/``, a part of
    the earlier layout converted into shards and an index. Once; it reads everything."""
    lines: dict[str, Any] = {}
    for key in store.list_keys(PARTS_PREFIX):
        if not key.endswith(".json"):
            continue
        document, data = _read(store, key)
        if document is None or "month" in document:
            continue  # a shard: its asset's index lists it
        asset = document.get("asset")
        if not isinstance(asset, str) or key != asset_index_key(
            dg.AssetKey.from_user_string(asset)
        ):
            raise ValueError(f"{store.address(key)} is not an {WHAT}")
        if _is_index(document):
            shards = document["parts"]
            lines[key] = {
                "sha256": _sha256(data or b""),
                "bytes": len(data or b""),
                "asset": asset,
                "objects": sum(line.get("objects", 0) for line in shards.values()),
                "written_at": _now(),
            }
        else:
            shards = {}
            _write_shards(store, asset, shards, _objects(store, key, document), merge=False)
            lines[key] = _write_asset_index(store, asset, shards)
    return lines


def record_exports(
    context: dg.AssetExecutionContext,
    ch: ClickHouse,
    store: ObjectStore,
    entries: dict[dg.AssetKey, Entries],
) -> None:
    """Merge each asset's ``entries`` (object key -> entry, each naming its
    ``partition``) into the shards of their months, then rewrite that asset's index,
    then ``exports/manifest.json`` (once, however many assets)."""
    entries = {key: objects for key, objects in entries.items() if objects}
    if not entries:
        return
    with one_run_at_a_time(context, ch, LOCK_NAME):
        left = _pending(store)  # a failed recording's shards: listed again here
        writing = {
            key.to_user_string(): {shard_month(str(e.get("partition"))) for e in objects.values()}
            for key, objects in entries.items()
        }
        todo = {a: sorted(left.get(a, set()) | writing.get(a, set())) for a in {*left, *writing}}
        write_document(store, PENDING_KEY, {"version": VERSION, "shards": todo})
        document, _ = _read(store, MANIFEST_KEY)
        lines = dict(document["parts"]) if _is_index(document) else _converted_index(store)
        for asset in sorted(todo):
            asset_key = dg.AssetKey.from_user_string(asset)
            objects = entries.get(asset_key, {})
            lines[asset_index_key(asset_key)] = _record_asset(
                store, asset_key, objects, left.get(asset, set())
            )
        write_document(
            store, MANIFEST_KEY, {"version": VERSION, "written_at": _now(), "parts": lines}
        )
        write_document(store, PENDING_KEY, {"version": VERSION, "shards": {}})


def _pending(store: ObjectStore) -> dict[str, set[str]]:
    """Asset -> months of the shards a recording was writing when it failed."""
    document, _ = _read(store, PENDING_KEY)
    shards = (document or {}).get("shards")
    if document is not None and not isinstance(shards, dict):
        raise ValueError(f"{store.address(PENDING_KEY)} is not an {WHAT}")
    return {
        asset: {m for m in months if isinstance(m, str) and re.fullmatch(r"\d{4}-\d{2}", m)}
        for asset, months in (shards or {}).items()
        if isinstance(asset, str) and isinstance(months, list)
    }


# -- reading and checking -----------------------------------------------------------


def _listed(
    store: ObjectStore, listing_key: str, line: dict[str, Any] | None, key: str
) -> tuple[dict[str, Any] | None, list[str]]:
    """The document at ``key`` and where it disagrees with its line in ``listing_key``."""
    document, data = _read(store, key)
    if line is None:
        return document, [f"{listing_key} does not list {key}"]
    if data is None:
        return None, [f"{listing_key} lists {key}, which does not exist"]
    found = _sha256(data)
    if found != line.get("sha256"):
        listed = str(line.get("sha256"))
        return document, [
            f"{listing_key} lists {key} with sha256 {listed[:12]}…, it has {found[:12]}…"
        ]
    return document, []


def asset_entries(
    store: ObjectStore, asset_key: dg.AssetKey, months: set[str] | None = None
) -> tuple[Entries, list[str]]:
    """The asset's entries (of ``months`` only, if given) as a client following the
    tree from ``exports/manifest.json`` finds them, and where a level's sha256 is not
    that of the object below it. The single-level layout is still read."""
    top, _ = _read(store, MANIFEST_KEY)
    key = asset_index_key(asset_key)
    if _is_index(top):
        index, problems = _listed(store, MANIFEST_KEY, top["parts"].get(key), key)
    else:  # none yet, or the single-level layout before its conversion
        index, problems = _read(store, key)[0], ([] if top else [f"there is no {MANIFEST_KEY}"])
    if index is None:
        return {}, problems
    if not _is_index(index):
        return _objects(store, key, index), problems
    entries: Entries = {}
    for shard, line in sorted(index["parts"].items()):
        if months is not None and line.get("month") not in months:
            continue
        document, found = _listed(store, key, line, shard)
        problems += found
        if document is not None:
            entries.update(_objects(store, shard, document))
    listed_months = {line.get("month") for line in index["parts"].values()}
    for month in sorted((months or set()) - listed_months):
        problems.append(f"{key} does not list {shard_key(asset_key, month)}")
    return entries, problems


def load_exports_manifest(store: ObjectStore) -> Entries:
    """Object key -> entry, every asset's, as a client following the tree finds them."""
    top, _ = _read(store, MANIFEST_KEY)
    if top is None:
        return {}
    if not _is_index(top):
        return _objects(store, MANIFEST_KEY, top)
    objects: Entries = {}
    for line in top["parts"].values():
        entries, _ = asset_entries(store, dg.AssetKey.from_user_string(line["asset"]))
        objects.update(entries)
    return objects


def manifest_disagreements(
    store: ObjectStore, asset_key: dg.AssetKey, recorded: dict[str, dict[str, str]]
) -> list[str]:
    """Where the asset's manifest entries differ from Dagster's record (partition ->
    object key -> sha256 recorded): a sync client trusts the manifest, so a stale
    entry, or a level of the tree not listing the one below as it is (a write failed
    after the object was published), is a failure of the asset's check. Reads the
    index, the asset's index and the shards of the recorded partitions' months."""
    if not any(recorded.values()):
        return []
    months = {shard_month(partition) for partition, objects in recorded.items() if objects}
    # The check takes no lock: a recording of another partition may rewrite a level
    # between two of its reads, a disagreement that is gone a moment later. Read again.
    for wait_s in (0.5, 2.0, None):
        entries, problems = asset_entries(store, asset_key, months)
        if not problems or wait_s is None:
            break
        time.sleep(wait_s)
    for objects in recorded.values():
        for key, sha256 in objects.items():
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
        "written_at": _now(),
    }
