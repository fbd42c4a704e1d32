"""The ``website_metrics`` asset: one pivoted gzip CSV per UTC day, for newsrooms and researchers."""

import csv
import io
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from ooni_pipeline.clickhouse import ClickHouse, ClickHouseResource
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.common import (
    CLICKHOUSE_POOL,
    OWNER,
    last_metadata,
    raise_refusals,
    shrink_refusal,
)
from ooni_pipeline.decompression import DecompressionLimitExceeded, open_bounded
from ooni_pipeline.exports.manifest import record_exports, upload_entry
from ooni_pipeline.exports.website_metrics_sql import CATEGORIES, CSV_COLUMNS, PIVOT_SQL, TOTALS_SQL
from ooni_pipeline.fastpath.assets import FASTPATH_KEY, MEASUREMENT_DAYS
from ooni_pipeline.fastpath.versions import day_versions
from ooni_pipeline.object_store import ObjectStoreResource, UploadResult, stream_upload
from ooni_pipeline.object_store.stores import ObjectStore

WEBSITE_METRICS_KEY = dg.AssetKey("website_metrics")
PARTITIONS = MEASUREMENT_DAYS
# Re-export a day when, and only when, its fastpath data version moved (late uploads,
# re-scoring); yesterday's export is kept on time by website_metrics_schedule.
REEXPORT_WHEN_SOURCE_CHANGED = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.in_progress()
    & ~dg.AutomationCondition.any_deps_in_progress()
).with_label("fastpath data version of the day changed")
OBJECT_PREFIX = "exports/website_metrics/"
PREVIEW_ROWS = 5
HEADER_LINE = (",".join(CSV_COLUMNS) + "\n").encode()


def object_key(day: str) -> str:
    return f"{OBJECT_PREFIX}{day}.csv.gz"


def day_window(day: str) -> dict[str, str]:
    """Bound parameters of one UTC day: [start, end)."""
    start = datetime.strptime(day, "%Y-%m-%d")
    return {
        "start": f"{start:%Y-%m-%d} 00:00:00",
        "end": f"{start + timedelta(days=1):%Y-%m-%d} 00:00:00",
    }


def source_totals(ch: ClickHouse, day: str) -> dict[str, Any]:
    """Rows and per-category totals of a day, straight from ``fastpath``."""
    df = ch.query_df(TOTALS_SQL, day_window(day))
    record = df.iloc[0].to_dict()
    totals = {name: int(record[name]) for name in ("rows", *CATEGORIES, "confirmed", "countries")}
    totals["top_countries"] = [str(cc) for cc in record["top_countries"]]
    return totals


class _Preview:
    """Keeps the first raw bytes of the CSV stream, for the preview in metadata."""

    def __init__(self, limit: int = 16_384):
        self.limit = limit
        self.data = bytearray()

    def tap(self, chunks):
        for chunk in chunks:
            if len(self.data) < self.limit:
                self.data += chunk[: self.limit - len(self.data)]
            yield chunk

    def text(self) -> str:
        """The header and first rows as plain text: cells come from probes, so they are
        never rendered as Markdown."""
        lines = bytes(self.data).decode("utf-8", "replace").splitlines()[: PREVIEW_ROWS + 1]
        return "\n".join(lines) or "(empty)"


@dataclass
class DayExport:
    day: str
    totals: dict[str, Any]
    upload: UploadResult
    preview: str
    duration_s: float
    source_version: str


def export_day(
    ch: ClickHouse,
    store: ObjectStore,
    day: str,
    gzip_level: int,
    source_version: str | None = None,
) -> DayExport:
    """Write one day's CSV object, streamed from ClickHouse through gzip to the store.

    ``source_version`` is the day's data version taken before its rows are read
    (read here if not given): a change landing later moves the version past this
    record, which triggers one more export, never one too few."""
    start = time.monotonic()
    params = day_window(day)
    if source_version is None:
        source_version = day_versions(ch, [day])[day]
    totals = source_totals(ch, day)
    preview = _Preview()
    chunks = preview.tap(_with_header(ch.stream(PIVOT_SQL, params, fmt="CSV")))
    upload = stream_upload(store, object_key(day), chunks, "gzip", level=gzip_level)
    return DayExport(day, totals, upload, preview.text(), time.monotonic() - start, source_version)


def _with_header(chunks):
    yield HEADER_LINE
    yield from chunks


class WebsiteMetricsConfig(dg.Config):
    gzip_level: int = Field(
        default=6, ge=1, le=9, description="gzip compression level of the objects"
    )
    force: bool = Field(
        default=False,
        description="replace published days even by an empty export or one under half "
        "their published rows (refused otherwise: a wrong or empty database looks like that)",
    )


def refusals_to_shrink(
    context: dg.AssetExecutionContext,
    store: ObjectStore,
    days: list[str],
    versions: dict[str, str],
) -> list[str]:
    """Days whose export would replace a published object with far fewer rows.

    Checked for every day of the run before any object is written, from the day's
    data version (its distinct measurements) and the rows recorded when the day was
    last published; an object with no record is only protected from an empty export."""
    refusals = []
    for day in days:
        new = int(versions[day].split("@")[0])
        published = last_metadata(context, WEBSITE_METRICS_KEY, day).get("dagster/row_count")
        if published is None and new == 0 and store.exists(object_key(day)):
            refusals.append(f"{day}: an empty export would replace the published object")
            continue
        refusal = shrink_refusal(day, published, new)
        if refusal:
            refusals.append(refusal)
    return refusals


@dg.asset(
    key=WEBSITE_METRICS_KEY,
    group_name="exports",
    kinds={"clickhouse", "s3", "csv"},
    owners=[OWNER],
    pool=CLICKHOUSE_POOL,
    partitions_def=PARTITIONS,
    deps=[FASTPATH_KEY],
    automation_condition=REEXPORT_WHEN_SOURCE_CHANGED,
    # A backfill of years becomes runs of a month each, not thousands of runs;
    # the pool keeps them from running side by side against ClickHouse.
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=31),
)
def website_metrics(
    context: dg.AssetExecutionContext,
    config: WebsiteMetricsConfig,
    clickhouse: ClickHouseResource,
    object_store: ObjectStoreResource,
) -> dg.MaterializeResult:
    """Web-connectivity results of one UTC day as a CSV pivoted by blocking type, at
    ``exports/website_metrics/<YYYY-MM-DD>.csv.gz``: one row per measurement (each
    ``measurement_uid`` once, its latest version) with one 0/1 column per outcome
    (accessible, dns, tcp_ip, http-diff, http-failure, anomaly, failure) and
    ``confirmed``, ready for Tableau, pandas or a spreadsheet. Computed and streamed
    by ClickHouse; rerunning a day overwrites its object, a failure keeps the old one.
    """
    store = object_store.get_store()
    days = list(context.partition_keys)
    exports: list[DayExport] = []
    with clickhouse.connect() as ch:
        ensure_tables(ch, "fastpath")
        # One grouped query for every day of the run: the shrink check's row counts
        # and the versions each day's export records.
        versions = day_versions(ch, days)
        if not config.force:
            raise_refusals(refusals_to_shrink(context, store, days, versions))
        for number, day in enumerate(days, start=1):
            export = export_day(ch, store, day, config.gzip_level, versions[day])
            exports.append(export)
            context.add_asset_metadata(_day_metadata(export), partition_key=day)
            entry = upload_entry(
                export.upload,
                export.totals["rows"],
                "csv.gz",
                WEBSITE_METRICS_KEY,
                day,
                export.source_version,
            )
            record_exports(context, ch, store, {WEBSITE_METRICS_KEY: {export.upload.key: entry}})
            context.log.info(
                f"[{number}/{len(days)}] {day}: {export.totals['rows']} rows, "
                f"{export.upload.bytes / 1e6:.1f} MB gzip in {export.duration_s:.1f} s -> {export.upload.address}"
            )
    return dg.MaterializeResult(
        metadata={"days_in_run": len(exports), "dagster/column_schema": COLUMN_SCHEMA}
    )


COLUMN_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn(name, "string" if i < 6 else "int") for i, name in enumerate(CSV_COLUMNS)
    ]
)


def _day_metadata(export: DayExport) -> dict[str, Any]:
    """One day's own figures, recorded on that partition's materialization (also in
    multi-day runs), including the totals the object check compares against."""
    address = export.upload.address
    metadata: dict[str, Any] = {
        "dagster/row_count": export.totals["rows"],
        "bytes": export.upload.bytes,
        "uncompressed_bytes": export.upload.raw_bytes,
        "duration_s": round(export.duration_s, 3),
        "sha256": export.upload.sha256,
        "object": dg.MetadataValue.url(address)
        if address.startswith("s3://")
        else dg.MetadataValue.path(address),
        "fastpath_data_version": export.source_version,
        "countries": export.totals["countries"],
        "top_countries": dg.MetadataValue.json(export.totals["top_countries"]),
        "preview": dg.MetadataValue.text(export.preview),
    }
    for category in (*CATEGORIES, "confirmed"):
        metadata[f"total_{category}"] = export.totals[category]
    return metadata


def read_object_totals(
    store: ObjectStore, key: str, max_bytes: int
) -> tuple[list[str], dict[str, int], int]:
    """(header, totals, rows with not exactly one category) of a published object,
    streamed and unpacked to at most ``max_bytes`` (``DecompressionLimitExceeded`` past it)."""
    totals = dict.fromkeys(("rows", *CATEGORIES, "confirmed"), 0)
    bad_rows = 0
    with (
        store.open_reader(key) as raw,
        open_bounded(raw, "gzip", limit=max_bytes, what=key) as unpacked,
        io.TextIOWrapper(unpacked, encoding="utf-8", newline="") as text,
    ):
        reader = csv.reader(text)
        header = next(reader, [])
        index = {name: header.index(name) for name in (*CATEGORIES, "confirmed") if name in header}
        for row in reader:
            totals["rows"] += 1
            flags = 0
            for name, i in index.items():
                value = int(row[i])
                totals[name] += value
                if name != "confirmed":
                    flags += value
            bad_rows += flags != 1
    return header, totals, bad_rows


@dg.asset_check(
    asset=website_metrics,
    pool=CLICKHOUSE_POOL,
    description="Each materialized day's object has the contract's header, one category per row, "
    "and exactly the totals recorded when it was exported; it is unpacked no further than the "
    "size recorded then. That fastpath moved on since "
    "(a late upload) is reported, not failed: the automation re-exports such days.",
)
def website_metrics_object_check(
    context: dg.AssetCheckExecutionContext,
    clickhouse: ClickHouseResource,
    object_store: ObjectStoreResource,
) -> dg.AssetCheckResult:
    store = object_store.get_store()
    if context.has_partition_key_range or context.has_partition_key:
        days = list(context.partition_keys)
    else:
        event = context.instance.get_latest_materialization_event(WEBSITE_METRICS_KEY)
        days = [event.dagster_event.partition] if event and event.dagster_event else []
    problems: list[str] = []
    recorded = {day: last_metadata(context, WEBSITE_METRICS_KEY, day) for day in days}
    for day in days:
        key = object_key(day)
        if not store.exists(key):
            problems.append(f"{day}: no object at {key}")
            continue
        # Unpacked no further than what was written: more is not the export.
        size = recorded[day].get("uncompressed_bytes")
        if not isinstance(size, int):
            problems.append(f"{day}: no recorded export to compare {key} with")
            continue
        try:
            header, totals, bad_rows = read_object_totals(store, key, size)
        except DecompressionLimitExceeded as exc:
            problems.append(f"{day}: {exc}")
            continue
        expected = {"rows": recorded[day].get("dagster/row_count")} | {
            name: recorded[day].get(f"total_{name}") for name in (*CATEGORIES, "confirmed")
        }
        if tuple(header) != CSV_COLUMNS:
            problems.append(f"{day}: the header differs from the contract")
        if bad_rows:
            problems.append(f"{day}: {bad_rows} rows without exactly one category")
        differing = {k: (totals[k], expected[k]) for k in totals if totals[k] != expected[k]}
        if differing:
            problems.append(
                f"{day}: object vs recorded totals (object, recorded) differ {differing}"
            )
    with clickhouse.connect() as ch:
        ensure_tables(ch, "fastpath")
        current = day_versions(ch, days)
    moved_on = [
        d for d in days if recorded[d].get("fastpath_data_version") not in (None, current[d])
    ]
    return dg.AssetCheckResult(
        passed=bool(days) and not problems,
        metadata={
            "days_checked": len(days),
            "problems": dg.MetadataValue.text("\n".join(problems) or "none"),
            "days_whose_fastpath_changed_since_export": dg.MetadataValue.json(moved_on),
        },
    )
