"""The ``website_metrics`` asset: one pivoted gzip CSV per UTC day, for newsrooms and researchers."""

import csv
import gzip
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from ooni_pipeline.clickhouse import ClickHouse, ClickHouseResource
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.common import CLICKHOUSE_POOL, OWNER
from ooni_pipeline.exports.website_metrics_sql import CATEGORIES, CSV_COLUMNS, PIVOT_SQL, TOTALS_SQL
from ooni_pipeline.object_store import ObjectStoreResource, UploadResult, stream_upload
from ooni_pipeline.object_store.stores import ObjectStore

WEBSITE_METRICS_KEY = dg.AssetKey("website_metrics")
PARTITIONS = dg.DailyPartitionsDefinition(start_date="2016-01-01", timezone="UTC")
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

    def markdown(self) -> str:
        lines = bytes(self.data).decode("utf-8", "replace").splitlines()[: PREVIEW_ROWS + 1]
        rows = list(csv.reader(lines))
        if not rows:
            return "(empty)"
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        out += [
            "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]
        ]
        return "\n".join(out)


@dataclass
class DayExport:
    day: str
    totals: dict[str, Any]
    upload: UploadResult
    preview: str
    duration_s: float


def export_day(ch: ClickHouse, store: ObjectStore, day: str, gzip_level: int) -> DayExport:
    """Write one day's CSV object, streamed from ClickHouse through gzip to the store."""
    start = time.monotonic()
    params = day_window(day)
    totals = source_totals(ch, day)
    preview = _Preview()
    chunks = preview.tap(_with_header(ch.stream(PIVOT_SQL, params, fmt="CSV")))
    upload = stream_upload(store, object_key(day), chunks, "gzip", level=gzip_level)
    return DayExport(day, totals, upload, preview.markdown(), time.monotonic() - start)


def _with_header(chunks):
    yield HEADER_LINE
    yield from chunks


class WebsiteMetricsConfig(dg.Config):
    gzip_level: int = Field(
        default=6, ge=1, le=9, description="gzip compression level of the objects"
    )


@dg.asset(
    key=WEBSITE_METRICS_KEY,
    group_name="exports",
    kinds={"clickhouse", "s3", "csv"},
    owners=[OWNER],
    pool=CLICKHOUSE_POOL,
    partitions_def=PARTITIONS,
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
        for number, day in enumerate(days, start=1):
            export = export_day(ch, store, day, config.gzip_level)
            exports.append(export)
            context.log.info(
                f"[{number}/{len(days)}] {day}: {export.totals['rows']} rows, "
                f"{export.upload.bytes / 1e6:.1f} MB gzip in {export.duration_s:.1f} s -> {export.upload.address}"
            )
    return dg.MaterializeResult(metadata=_metadata(exports))


def _metadata(exports: list[DayExport]) -> dict[str, Any]:
    rows = sum(e.totals["rows"] for e in exports)
    metadata: dict[str, Any] = {
        "dagster/row_count": rows,
        "bytes": sum(e.upload.bytes for e in exports),
        "uncompressed_bytes": sum(e.upload.raw_bytes for e in exports),
        "duration_s": round(sum(e.duration_s for e in exports), 3),
        "days": len(exports),
        "dagster/column_schema": dg.TableSchema(
            columns=[
                dg.TableColumn(name, "string" if i < 6 else "int")
                for i, name in enumerate(CSV_COLUMNS)
            ]
        ),
    }
    for category in (*CATEGORIES, "confirmed"):
        metadata[f"total_{category}"] = sum(e.totals[category] for e in exports)
    if len(exports) == 1:
        (export,) = exports
        metadata.update(
            {
                "object": dg.MetadataValue.url(export.upload.address)
                if export.upload.address.startswith("s3://")
                else dg.MetadataValue.path(export.upload.address),
                "countries": export.totals["countries"],
                "top_countries": dg.MetadataValue.json(export.totals["top_countries"]),
                "sha256": export.upload.sha256,
                "preview": dg.MetadataValue.md(export.preview),
            }
        )
    else:
        lines = ["| day | rows | bytes | object |", "|---|---|---|---|"]
        lines += [
            f"| {e.day} | {e.totals['rows']} | {e.upload.bytes} | {e.upload.address} |"
            for e in exports
        ]
        metadata["per_day"] = dg.MetadataValue.md("\n".join(lines))
    return metadata


def read_object_totals(store: ObjectStore, key: str) -> tuple[list[str], dict[str, int], int]:
    """(header, totals, rows with not exactly one category) of a published object, streamed."""
    totals = dict.fromkeys(("rows", *CATEGORIES, "confirmed"), 0)
    bad_rows = 0
    with store.open_reader(key) as raw, gzip.open(raw, "rt", encoding="utf-8", newline="") as text:
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
    description="The object of each materialized day has the contract's header, one category per row, "
    "and the same totals as fastpath.",
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
    with clickhouse.connect() as ch:
        ensure_tables(ch, "fastpath")
        for day in days:
            key = object_key(day)
            if not store.exists(key):
                problems.append(f"{day}: no object at {key}")
                continue
            header, totals, bad_rows = read_object_totals(store, key)
            source = source_totals(ch, day)
            if tuple(header) != CSV_COLUMNS:
                problems.append(f"{day}: header {header} differs from the contract")
            if bad_rows:
                problems.append(f"{day}: {bad_rows} rows without exactly one category")
            differing = {k: (totals[k], source[k]) for k in totals if totals[k] != source[k]}
            if differing:
                problems.append(f"{day}: object vs fastpath totals differ {differing}")
    return dg.AssetCheckResult(
        passed=bool(days) and not problems,
        metadata={
            "days_checked": len(days),
            "problems": dg.MetadataValue.md("\n".join(problems) or "none"),
        },
    )
