"""The ``website_metrics`` asset: one pivoted gzip CSV per UTC day, for newsrooms and researchers."""

import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, BinaryIO

import dagster as dg
from pydantic import Field

from ooni_pipeline import settings
from ooni_pipeline.clickhouse import ClickHouse, ClickHouseResource
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.common import (
    CLICKHOUSE_POOL,
    OWNER,
    checked_partitions,
    last_metadata,
    publishing,
    raise_refusals,
    record_partition,
    shrink_refusal,
)
from ooni_pipeline.exports.engine_file import engine_file, file_digest
from ooni_pipeline.exports.manifest import manifest_disagreements, record_exports, upload_entry
from ooni_pipeline.exports.website_metrics_sql import (
    CATEGORIES,
    CSV_COLUMNS,
    CSV_FORMAT,
    CSV_FORMAT_SETTINGS,
    PIVOT_SQL,
    csv_select,
)
from ooni_pipeline.fastpath.assets import FASTPATH_KEY, MEASUREMENT_DAYS
from ooni_pipeline.fastpath.versions import day_versions, measurements
from ooni_pipeline.object_store import ObjectStoreResource, UploadResult
from ooni_pipeline.object_store.stores import ObjectStore, object_digest
from ooni_pipeline.untrusted import excerpt

WEBSITE_METRICS_KEY = dg.AssetKey("website_metrics")
PARTITIONS = MEASUREMENT_DAYS
# Re-exports wait for a daily tick (``OONI_REEXPORT_CRON``, 04:30 UTC by default, after
# the 01:00 and 01:15 exports of yesterday). OONI's service writes continuously: with
# ``OONI_FASTPATH_SOURCE=external`` the hourly observation moves the version of nearly
# every recent day every hour, and a backfill of public_fastpath moves a day's once per
# upload day. Exporting on each move re-wrote the same days every hour; here a day is
# re-exported at most once a day, and only when its data moved since it was last
# exported. Yesterday's export stays on time through the schedules.
REEXPORT_CRON_ENV = "OONI_REEXPORT_CRON"
DEFAULT_REEXPORT_CRON = "30 4 * * *"


def reexport_cron() -> str:
    """The settle tick of re-exports (``$OONI_REEXPORT_CRON``), read at load."""
    from dagster._utils.schedules import is_valid_cron_string

    cron = settings.env(REEXPORT_CRON_ENV, DEFAULT_REEXPORT_CRON) or DEFAULT_REEXPORT_CRON
    if not is_valid_cron_string(cron):
        raise ValueError(f"{REEXPORT_CRON_ENV} is not a cron schedule: {excerpt(cron)}")
    return cron


def reexport_when(changed: dg.AutomationCondition, cron: str) -> dg.AutomationCondition:
    """Materialize a partition after ``changed`` became true since it was last requested
    or materialized, once the first tick of ``cron`` after that has passed; never beside
    a run of it or of its dependencies."""
    handled = dg.AutomationCondition.newly_requested() | dg.AutomationCondition.newly_updated()
    return (
        changed.since_last_handled()
        & dg.AutomationCondition.cron_tick_passed(cron, "UTC").since(handled)
        & ~dg.AutomationCondition.in_progress()
        & ~dg.AutomationCondition.any_deps_in_progress()
    )


REEXPORT_WHEN_SOURCE_CHANGED = reexport_when(
    dg.AutomationCondition.any_deps_updated(), reexport_cron()
).with_label("fastpath data version of the day changed; re-exported at the daily tick")
OBJECT_PREFIX = "exports/website_metrics/"
PREVIEW_ROWS = 5
PREVIEW_BYTES = 16_384
CSV_BLOCK = 4 << 20
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


class CsvTotals:
    """Figures of the contract's CSV as it is read: rows, each column's total, rows
    without exactly one category, countries, and the first bytes for the preview.

    Read by Arrow's multi-threaded CSV reader (C++), several times faster than
    Python's csv module; only the columns the figures need are converted."""

    def __init__(self, source: BinaryIO, what: str):
        self.what = what
        self.header: list[str] = []
        self.totals = dict.fromkeys(("rows", *CATEGORIES, "confirmed"), 0)
        self.bad_rows = 0
        self.raw_bytes = 0
        self.countries: Counter[str] = Counter()
        self._head = bytearray()
        self._read(source)

    def read(self, size: int = -1) -> bytes:
        """The source's bytes as Arrow asks for them, counted and the first kept."""
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        data = self._source.read(size)
        self.raw_bytes += len(data)
        if len(self._head) < PREVIEW_BYTES:
            self._head += data[: PREVIEW_BYTES - len(self._head)]
        return data

    def _read(self, source: BinaryIO) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pacsv

        self._source, self._pending = source, b""
        first = self.read(len(HEADER_LINE))
        if first != HEADER_LINE:
            self.header = first.split(b"\n", 1)[0].decode("utf-8", "replace").split(",")
            return
        self.header = list(CSV_COLUMNS)
        self._pending = self.read(CSV_BLOCK)
        if not self._pending:
            return  # a day without measurements: the header alone
        counted = (*CATEGORIES, "confirmed")
        reader = pacsv.open_csv(
            pa.PythonFile(self, mode="r"),
            read_options=pacsv.ReadOptions(column_names=list(CSV_COLUMNS), block_size=CSV_BLOCK),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                include_columns=["probe_cc", *counted],
                column_types={"probe_cc": pa.string()} | dict.fromkeys(counted, pa.int64()),
            ),
        )
        for batch in reader:
            self.totals["rows"] += batch.num_rows
            flags = None
            for name in counted:
                column = batch.column(name)
                self.totals[name] += pc.sum(column).as_py() or 0
                if name != "confirmed":
                    flags = column if flags is None else pc.add(flags, column)
            if flags is not None:
                self.bad_rows += pc.sum(pc.not_equal(flags, 1)).as_py() or 0
            for entry in pc.value_counts(batch.column("probe_cc")).to_pylist():
                self.countries[entry["values"]] += entry["counts"]

    # pa.PythonFile asks for these of a readable file.
    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def figures(self) -> dict[str, Any]:
        """The totals recorded in metadata (and compared by the check)."""
        return self.totals | {
            "countries": len(self.countries),
            "top_countries": [cc for cc, _ in self.countries.most_common(10)],
        }

    def preview(self) -> str:
        """The header and first rows as plain text: cells come from probes, so they are
        never rendered as Markdown."""
        lines = bytes(self._head).decode("utf-8", "replace").splitlines()[: PREVIEW_ROWS + 1]
        return "\n".join(lines) or "(empty)"

    def problems(self) -> list[str]:
        """What makes this not the contract's CSV, in words (no cell is quoted)."""
        problems = []
        if tuple(self.header) != CSV_COLUMNS:
            problems.append("the header differs from the contract")
        if self.bad_rows:
            problems.append(f"{self.bad_rows} rows without exactly one category")
        return problems


def read_csv_totals(source: BinaryIO, what: str) -> CsvTotals:
    """``CsvTotals`` of an unpacked CSV; a file that is not a CSV of the contract's
    14 columns raises ``ValueError`` naming ``what`` (Arrow's message quotes cells)."""
    import pyarrow as pa

    try:
        return CsvTotals(source, what)
    except pa.ArrowException as exc:
        raise ValueError(
            f"{what} is not a CSV of the contract's {len(CSV_COLUMNS)} columns "
            f"({type(exc).__name__})"
        ) from None


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
    """Write one day's CSV object, pivoted and gzip-compressed by ClickHouse.

    Embedded, the engine writes the file itself (``file()``); a server sends it
    compressed over HTTP. Either way the file is staged and read as it is written,
    on the core the engine's single-threaded gzip leaves idle, for the figures
    recorded in metadata (which also proves it is the contract's CSV and holds every
    measurement of the day); only then does it become the object.

    ``source_version`` is the day's data version taken before its rows are read
    (read here if not given): a change landing later moves the version past this
    record, which triggers one more export, never one too few."""
    start = time.monotonic()
    params = day_window(day)
    if source_version is None:
        source_version = day_versions(ch, [day])[day]
    key = object_key(day)
    with engine_file(
        ch,
        store,
        key,
        csv_select(PIVOT_SQL),
        params,
        fmt=CSV_FORMAT,
        settings=CSV_FORMAT_SETTINGS,
        gzip_level=gzip_level,
        reader=lambda written: _gzip_csv_totals(written, key),
    ) as staged:
        figures = staged.read
        problems = figures.problems()
        expected = measurements(source_version)
        if figures.totals["rows"] < expected:
            problems.append(f"{figures.totals['rows']} rows, the day has {expected} measurements")
        if problems:
            raise RuntimeError(f"{day}: the export is not published: {'; '.join(problems)}")
        digest, size = file_digest(staged.path)
    upload = UploadResult(
        key=key,
        address=store.address(key),
        raw_bytes=figures.raw_bytes,
        bytes=size,
        sha256=digest,
        duration_s=time.monotonic() - start,
    )
    return DayExport(
        day, figures.figures(), upload, figures.preview(), time.monotonic() - start, source_version
    )


def _gzip_csv_totals(source: BinaryIO, key: str) -> CsvTotals:
    """``CsvTotals`` of the file being written: inflated by Arrow (C++, about 1.4x
    Python's gzip module here); unbounded, as this is the engine's own output."""
    import pyarrow as pa

    with pa.CompressedInputStream(pa.PythonFile(source, mode="r"), "gzip") as unpacked:
        return read_csv_totals(unpacked, key)


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
        new = measurements(versions[day])
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
    # A backfill (from the UI, or `dagster asset materialize --partition-range` in a
    # shell, which needs this policy) is one run over its days; each day is recorded
    # as it is published, so a failure part-way loses none, and the pool keeps runs
    # from going side by side against ClickHouse.
    backfill_policy=dg.BackfillPolicy.single_run(),
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
            # The day's object, Dagster's record of it and its manifest entry, by one
            # run at a time and recorded the moment it is published (a later day
            # failing leaves every published day recorded).
            with publishing(context, ch, WEBSITE_METRICS_KEY, day):
                export = export_day(ch, store, day, config.gzip_level, versions[day])
                exports.append(export)
                record_partition(context, WEBSITE_METRICS_KEY, day, _day_metadata(export))
                entry = upload_entry(
                    export.upload,
                    export.totals["rows"],
                    "csv.gz",
                    WEBSITE_METRICS_KEY,
                    day,
                    export.source_version,
                )
                record_exports(
                    context, ch, store, {WEBSITE_METRICS_KEY: {export.upload.key: entry}}
                )
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


@dg.asset_check(
    asset=website_metrics,
    pool=CLICKHOUSE_POOL,
    description="Each materialized day's object is, byte for byte, the one its export wrote "
    "(sha256 and size as recorded), and exports/manifest.json lists it so: the export "
    "validated that file before publishing it "
    "(the contract's header, one category per row, every measurement of the day), so the "
    "object still being it is the whole proof; it is read no further than its recorded size. "
    "That fastpath moved on since (a late upload) is reported, not failed: the automation "
    "re-exports such days.",
)
def website_metrics_object_check(
    context: dg.AssetCheckExecutionContext,
    clickhouse: ClickHouseResource,
    object_store: ObjectStoreResource,
) -> dg.AssetCheckResult:
    store = object_store.get_store()
    days = checked_partitions(context, WEBSITE_METRICS_KEY, PARTITIONS)
    problems: list[str] = []
    recorded = {day: last_metadata(context, WEBSITE_METRICS_KEY, day) for day in days}
    for day in days:
        key = object_key(day)
        if not store.exists(key):
            problems.append(f"{day}: no object at {key}")
            continue
        size, sha256 = recorded[day].get("bytes"), recorded[day].get("sha256")
        if not isinstance(size, int) or not isinstance(sha256, str):
            problems.append(f"{day}: no recorded export to compare {key} with")
            continue
        found, found_size = object_digest(store, key, size)
        if (found, found_size) != (sha256, size):
            longer = " or more" if found_size > size else ""
            problems.append(
                f"{day}: {key} is not the object its export wrote ({found_size}{longer} bytes, "
                f"sha256 {found[:12]}…; recorded {size} bytes, sha256 {sha256[:12]}…)"
            )
    problems += manifest_disagreements(
        store,
        WEBSITE_METRICS_KEY,
        {
            d: {object_key(d): r["sha256"]}
            for d, r in recorded.items()
            if isinstance(r.get("sha256"), str)
        },
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
