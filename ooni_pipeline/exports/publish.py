"""Writing one consumer export object (gzip CSV or Parquet) and recording it.

Shared by the watchlists, the aggregates and the Parquet copies: every object is
produced by one ClickHouse query, written into the object store all or nothing,
and described by the same figures (key, rows, bytes, sha256, source version) in its
partition's metadata and in ``exports/manifest.json``.
"""

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline.clickhouse.connection import StreamTail
from ooni_pipeline.common import (
    checked_partitions,
    last_metadata,
    publishing,
    record_partition,
    shrink_refusal,
)
from ooni_pipeline.exports.engine_file import engine_file, file_digest
from ooni_pipeline.fastpath.versions import measurements
from ooni_pipeline.object_store import ObjectStoreResource, UploadResult, stream_upload
from ooni_pipeline.object_store.stores import ObjectStore, object_digest

PARQUET_SETTINGS = "output_format_parquet_compression_method = 'zstd'"
READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class Written:
    """One object as written: what the metadata, the manifest and the check record."""

    key: str
    format: str  # "csv.gz" or "parquet"
    rows: int
    upload: UploadResult

    def entry(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "format": self.format,
            "rows": self.rows,
            "bytes": self.upload.bytes,
            "uncompressed_bytes": self.upload.raw_bytes,
            "sha256": self.upload.sha256,
        }


class CsvRecords:
    """Splits a CSV byte stream into records, newlines inside quoted fields kept.

    ClickHouse doubles a quote inside a quoted field, so a newline ends a record
    exactly when the quotes before it are even in number."""

    def __init__(self) -> None:
        self.rows = 0

    def count(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """``chunks`` unchanged, counting records on the way."""
        odd = False
        for chunk in chunks:
            if b'"' not in chunk and not odd:
                self.rows += chunk.count(b"\n")
            else:
                pieces = chunk.split(b"\n")
                for piece in pieces[:-1]:  # each is followed by a newline
                    odd ^= piece.count(b'"') % 2 == 1
                    self.rows += not odd
                odd ^= pieces[-1].count(b'"') % 2 == 1
            yield chunk

    @staticmethod
    def split(chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Whole records (each ending with its newline)."""
        pending: list[bytes] = []
        odd = False
        for chunk in chunks:
            pieces = chunk.split(b"\n")
            for piece in pieces[:-1]:
                pending.append(piece + b"\n")
                odd ^= piece.count(b'"') % 2 == 1
                if not odd:
                    yield b"".join(pending)
                    pending.clear()
            if pieces[-1]:
                pending.append(pieces[-1])
                odd ^= pieces[-1].count(b'"') % 2 == 1
        if pending:
            yield b"".join(pending)


def header_line(columns: Sequence[str]) -> bytes:
    return (",".join(columns) + "\n").encode()


class IncompleteExportError(RuntimeError):
    """An object's stream did not hold the rows the engine counted apart: not published."""


def write_csv(
    store: ObjectStore,
    key: str,
    columns: Sequence[str],
    body: Iterable[bytes],
    gzip_level: int,
    rows: int,
) -> Written:
    """A gzip CSV object: the header, then ``body`` (CSV records without header:
    chdb repeats a ``CSVWithNames`` header in every streamed chunk). An empty
    body gives a header-only object.

    ``rows`` is how many records the engine counted apart (a ``count()``): the
    records streamed are counted on the way and must be as many before the object
    replaces the previous one. A server before 25.11 ends a query failing mid-answer
    with status 200 and its message as body text (ClickHouse#9579, #68800): such a
    stream is short, or one line longer, or ends with that text, and is never
    published."""
    records, tail = CsvRecords(), StreamTail()

    def chunks() -> Iterator[bytes]:
        yield header_line(columns)
        for chunk in records.count(body):
            tail.add(chunk)
            yield chunk

    def verify() -> None:
        error_text = tail.ends_with_server_error()
        if records.rows != rows or error_text:
            raise IncompleteExportError(
                f"{key}: {records.rows} CSV records arrived, the engine counted {rows}"
                f"{', the last one an error text' if error_text else ''}; "
                "not published, the previous object is kept"
            )

    upload = stream_upload(store, key, chunks(), "gzip", level=gzip_level, before_commit=verify)
    return Written(key, "csv.gz", rows, upload)


def write_parquet(
    ch: ClickHouse, store: ObjectStore, key: str, sql: str, params: dict[str, Any], rows: int
) -> Written:
    """A Parquet object written by the engine (``engine_file``); its footer must
    give the ``rows`` counted apart before it replaces the previous object (a cut
    server stream has no footer, or the wrong one). An empty result is a file with
    the schema and no row group."""
    import pyarrow as pa  # here: the code location loads without pyarrow
    import pyarrow.parquet as pq

    start = time.monotonic()
    with engine_file(
        ch, store, key, sql, params, fmt="Parquet", settings=PARQUET_SETTINGS
    ) as staged:
        try:
            found = pq.read_metadata(staged.path).num_rows
        except (pa.ArrowException, OSError) as exc:
            raise IncompleteExportError(
                f"{key}: not a whole Parquet file ({type(exc).__name__}); not published"
            ) from None
        if found != rows:
            raise IncompleteExportError(
                f"{key}: {found} rows in the Parquet file, the engine counted {rows}; "
                "not published, the previous object is kept"
            )
        digest, size = file_digest(staged.path)
    upload = UploadResult(
        key=key,
        address=store.address(key),
        raw_bytes=size,
        bytes=size,
        sha256=digest,
        duration_s=time.monotonic() - start,
    )
    return Written(key, "parquet", rows, upload)


def objects_metadata(written: Sequence[Written], source_version: str) -> dict[str, Any]:
    """A partition's metadata: the first object's figures at the top (row count,
    bytes, key, sha256), every object in ``objects`` for the check."""
    main = written[0]
    address = main.upload.address
    return {
        "dagster/row_count": main.rows,
        "bytes": main.upload.bytes,
        "key": main.key,
        "sha256": main.upload.sha256,
        "object": dg.MetadataValue.url(address)
        if address.startswith("s3://")
        else dg.MetadataValue.path(address),
        "objects": dg.MetadataValue.json([w.entry() for w in written]),
        "fastpath_data_version": source_version,
    }


def refusals_to_shrink(
    context: dg.AssetExecutionContext,
    store: ObjectStore,
    asset_key: dg.AssetKey,
    partitions: dict[str, str],
    main_key: Callable[[str], str],
) -> list[str]:
    """Partitions whose source now holds far fewer measurements than when their
    objects were last published (a wrong or empty database looks like that).

    ``partitions`` maps partition -> current source version; ``main_key(partition)``
    is its main object, protected from an empty source even without a record."""
    refusals = []
    for partition, version in partitions.items():
        new = measurements(version)
        recorded = last_metadata(context, asset_key, partition).get("fastpath_data_version")
        what = f"{asset_key.to_user_string()} {partition}"
        if recorded is None:
            if new == 0 and store.exists(main_key(partition)):
                refusals.append(f"{what}: an empty source would replace the published object")
            continue
        refusal = shrink_refusal(what, measurements(recorded), new, unit="measurements")
        if refusal:
            refusals.append(refusal)
    return refusals


def verify_object(store: ObjectStore, entry: dict[str, Any]) -> list[str]:
    """What differs between a published object and its recorded entry: presence,
    then its bytes (sha256 and size, read no further than the recorded size). The
    rows and columns recorded were those of these very bytes, so a match proves them."""
    key = entry["key"]
    if not store.exists(key):
        return [f"no object at {key}"]
    if object_digest(store, key, entry["bytes"]) != (entry["sha256"], entry["bytes"]):
        return [f"{key}: sha256 differs from the one recorded (replaced since?)"]
    return []


@dataclass
class PartitionObjects:
    """One partition's objects as they are published, by asset (``objects[key]``);
    an asset whose objects are all written is ``finish``ed."""

    objects: dict[dg.AssetKey, list[Written]]
    done: set[dg.AssetKey] = field(default_factory=set)

    def __getitem__(self, key: dg.AssetKey) -> list[Written]:
        return self.objects[key]

    def finish(self, key: dg.AssetKey) -> None:
        self.done.add(key)


def record_partitions(
    context: dg.AssetExecutionContext,
    ch: ClickHouse,
    store: ObjectStore,
    partition: str,
    version: str,
    written: dict[dg.AssetKey, list[Written]],
    cut_off: frozenset[dg.AssetKey] = frozenset(),
) -> None:
    """Record each asset's objects of a partition in Dagster (at once, see
    ``common.record_partition``) and in the manifest.

    ``cut_off``: assets whose production failed after publishing some of their
    objects; each one's record lists those with the entries recorded before for its
    objects not written again (still the previous ones), so record, manifest and
    objects agree, and is marked ``incomplete``, which fails the asset's check until
    a run completes it."""
    from ooni_pipeline.exports.manifest import manifest_entry, record_exports

    for asset_key, objects in written.items():
        if not objects:
            continue
        metadata = objects_metadata(objects, version)
        if asset_key in cut_off:
            keys = {w.key for w in objects}
            before = last_metadata(context, asset_key, partition).get("objects") or []
            kept = [e for e in before if e.get("key") not in keys]
            metadata["objects"] = dg.MetadataValue.json([w.entry() for w in objects] + kept)
            # Some objects are of the new version and some of the previous one: the
            # check fails on this record until the partition is materialized again.
            metadata["incomplete"] = True
        record_partition(context, asset_key, partition, metadata)
        context.log.info(
            f"{asset_key.to_user_string()} {partition}: "
            + ", ".join(f"{w.key} ({w.rows} rows, {w.upload.bytes} bytes)" for w in objects)
        )
    record_exports(
        context,
        ch,
        store,
        {
            asset_key: {w.key: manifest_entry(w, asset_key, partition, version) for w in objects}
            for asset_key, objects in written.items()
        },
    )


@contextmanager
def publishing_partition(
    context: dg.AssetExecutionContext,
    ch: ClickHouse,
    store: ObjectStore,
    partition: str,
    version: str,
    asset_keys: Sequence[dg.AssetKey],
) -> Iterator[PartitionObjects]:
    """The objects of ``asset_keys`` for one partition, published by this run alone
    (``common.publishing``, one lock per asset, taken in order) and recorded when
    the block ends: all of them, or, if it fails, those published before the
    failure (then the error is raised); the producer ``finish``es each asset."""
    written = PartitionObjects({key: [] for key in asset_keys})
    with ExitStack() as locks:
        for key in sorted(set(asset_keys), key=lambda k: k.to_user_string()):
            locks.enter_context(publishing(context, ch, key, partition))
        try:
            yield written
        except BaseException:
            if any(written.objects.values()):
                cut_off = frozenset(k for k in written.objects if k not in written.done)
                try:
                    record_partitions(
                        context, ch, store, partition, version, written.objects, cut_off
                    )
                except Exception as exc:  # the partition's own failure is the one to raise
                    context.log.error(
                        f"{partition}: the objects published before the failure could not "
                        f"be recorded ({type(exc).__name__}: {exc})"
                    )
            raise
        record_partitions(context, ch, store, partition, version, written.objects)


def publish_partitions(
    context: dg.AssetExecutionContext,
    ch: ClickHouse,
    store: ObjectStore,
    asset_key: dg.AssetKey,
    versions: dict[str, str],
    produce: Callable[[str, list[Written]], None],
) -> None:
    """Write each partition's objects with ``produce(partition, written)`` (which
    appends each object to ``written`` as it is published) and record them."""
    for partition, version in versions.items():
        with publishing_partition(context, ch, store, partition, version, [asset_key]) as out:
            produce(partition, out[asset_key])
            out.finish(asset_key)


def build_objects_check(asset_key: dg.AssetKey, partitions_def: dg.PartitionsDefinition):
    """The check of an export asset: each materialized partition's objects are
    there, byte for byte as written (sha256 and size)."""

    @dg.asset_check(
        asset=asset_key,
        name="objects_check",
        description="Each materialized partition's objects exist and are, byte for byte, "
        "the ones written (the sha256 and size recorded then; read no further than that size), "
        "exports/manifest.json lists them so, and the partition's last run published all of "
        "them (a run failing part-way records what it published, marked incomplete).",
    )
    def objects_check(
        context: dg.AssetCheckExecutionContext, object_store: ObjectStoreResource
    ) -> dg.AssetCheckResult:
        from ooni_pipeline.exports.manifest import manifest_disagreements

        store = object_store.get_store()
        partitions = checked_partitions(context, asset_key, partitions_def)
        problems: list[str] = []
        checked = 0
        recorded: dict[str, dict[str, str]] = {}
        for partition in partitions:
            metadata = last_metadata(context, asset_key, partition)
            entries = metadata.get("objects") or []
            if not entries:
                problems.append(f"{partition}: no recorded objects")
            if metadata.get("incomplete"):
                problems.append(
                    f"{partition}: its last run failed after publishing only some of its "
                    "objects (recorded as they are); materialize it again"
                )
            for entry in entries:
                checked += 1
                problems += verify_object(store, entry)
                recorded.setdefault(partition, {})[entry["key"]] = entry["sha256"]
        problems += manifest_disagreements(store, asset_key, recorded)
        return dg.AssetCheckResult(
            passed=bool(partitions) and not problems,
            metadata={
                "partitions_checked": len(partitions),
                "objects_checked": checked,
                "problems": dg.MetadataValue.text("\n".join(problems) or "none"),
            },
        )

    return objects_check
