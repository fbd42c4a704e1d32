"""Aggregates of the website-metrics rows: per network and day, per country and month.

Both group the very rows of ``website_metrics`` (its query, ``PIVOT_SQL``: same
deduplication, same category rule), so their counts add up to the per-measurement
CSV's: the daily one the day's stage of those rows (``daily_consumers``, which
materializes it), the monthly one ``PIVOT_SQL`` over the month. Each partition is
a gzip CSV and a Parquet file in a Hive layout, both written by ClickHouse.
"""

import hashlib
from datetime import date, datetime

import dagster as dg
from pydantic import Field

from ooni_pipeline.clickhouse import ClickHouseResource
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.common import CLICKHOUSE_POOL, OWNER, raise_refusals
from ooni_pipeline.exports.publish import (
    Written,
    build_objects_check,
    publish_partitions,
    refusals_to_shrink,
    write_csv,
    write_parquet,
)
from ooni_pipeline.exports.stage import ordered, ordered_csv, staged
from ooni_pipeline.exports.website_metrics import reexport_cron, reexport_when
from ooni_pipeline.exports.website_metrics_sql import CATEGORIES, PIVOT_SQL
from ooni_pipeline.fastpath.assets import FASTPATH_KEY
from ooni_pipeline.fastpath.versions import day_versions, measurements
from ooni_pipeline.object_store import ObjectStoreResource

DAILY_KEY = dg.AssetKey("website_metrics_daily")
MONTHLY_KEY = dg.AssetKey("website_metrics_monthly")
MONTHS = dg.MonthlyPartitionsDefinition(start_date="2016-01", fmt="%Y-%m", timezone="UTC")

COUNT_COLUMNS = ("measurement_count", *CATEGORIES, "confirmed")
DAILY_COLUMNS = ("probe_cc", "probe_asn", "domain", "input", *COUNT_COLUMNS)
MONTHLY_COLUMNS = ("probe_cc", "domain", "input", *COUNT_COLUMNS, "networks", "days")

_COUNTS = ",\n    ".join(
    ["count() AS measurement_count"]
    + [f"sum(`{c}`) AS `{c}`" for c in CATEGORIES]
    + ["sum(confirmed) AS confirmed"]
)
DAILY_ORDER = "probe_cc, probe_asn, domain, input"
MONTHLY_ORDER = "probe_cc, domain, input"


def daily_sql(rows: str) -> str:
    """The daily aggregate of ``rows`` (a table, or a subquery of website_metrics rows)."""
    return f"""
SELECT probe_cc, probe_asn, domain, input,
    {_COUNTS}
FROM {rows}
GROUP BY {DAILY_ORDER}
"""


# bound: start, end (one UTC month)
MONTHLY_SQL = f"""
SELECT probe_cc, domain, input,
    {_COUNTS},
    uniqExact(probe_asn) AS networks,
    uniqExact(substring(measurement_start_time, 1, 10)) AS days
FROM ({PIVOT_SQL})
GROUP BY {MONTHLY_ORDER}
"""


def daily_key(day: str) -> str:
    return f"exports/website_metrics_daily/{day}.csv.gz"


def daily_parquet_key(day: str) -> str:
    return f"exports/parquet/website_metrics_daily/day={day}/website_metrics_daily_{day}.parquet"


def monthly_key(month: str) -> str:
    return f"exports/website_metrics_monthly/{month}.csv.gz"


def monthly_parquet_key(month: str) -> str:
    return (
        f"exports/parquet/website_metrics_monthly/month={month}/"
        f"website_metrics_monthly_{month}.parquet"
    )


def month_window(month: str) -> dict[str, str]:
    """Bound parameters of one UTC month: [start, end)."""
    start = datetime.strptime(month, "%Y-%m")
    end = datetime(start.year + start.month // 12, start.month % 12 + 1, 1)
    return {"start": f"{start:%Y-%m-%d} 00:00:00", "end": f"{end:%Y-%m-%d} 00:00:00"}


def month_days(month: str) -> list[str]:
    window = month_window(month)
    first = date.fromisoformat(window["start"][:10])
    last = date.fromisoformat(window["end"][:10])
    return [date.fromordinal(d).isoformat() for d in range(first.toordinal(), last.toordinal())]


def month_version(versions: dict[str, str]) -> str:
    """One version for a month: its measurements, and a digest of its days' versions."""
    total = sum(measurements(v) for v in versions.values())
    digest = hashlib.sha256(";".join(f"{d}={versions[d]}" for d in sorted(versions)).encode())
    return f"{total}@{digest.hexdigest()[:16]}"


class AggregateExportConfig(dg.Config):
    gzip_level: int = Field(default=6, ge=1, le=9, description="gzip level of the CSV objects")
    force: bool = Field(
        default=False,
        description="replace published partitions even when the source now holds under "
        "half the measurements it had when they were written (refused otherwise)",
    )


@dg.asset(
    key=MONTHLY_KEY,
    group_name="exports",
    kinds={"clickhouse", "s3", "csv", "parquet"},
    owners=[OWNER],
    pool=CLICKHOUSE_POOL,
    partitions_def=MONTHS,
    # Each month reads its days of fastpath, and follows its days' exports: it is
    # re-exported (at the daily tick, see ``reexport_when``) only after one of its days'
    # ``website_metrics_daily`` was, not on every move of fastpath's versions.
    deps=[
        dg.AssetDep(FASTPATH_KEY, partition_mapping=dg.TimeWindowPartitionMapping()),
        dg.AssetDep(DAILY_KEY, partition_mapping=dg.TimeWindowPartitionMapping()),
    ],
    automation_condition=reexport_when(
        dg.AutomationCondition.any_deps_updated().allow(dg.AssetSelection.assets(DAILY_KEY)),
        reexport_cron(),
    ).with_label("a day's website_metrics_daily was exported; re-exported at the daily tick"),
    backfill_policy=dg.BackfillPolicy.single_run(),
)
def website_metrics_monthly(
    context: dg.AssetExecutionContext,
    config: AggregateExportConfig,
    clickhouse: ClickHouseResource,
    object_store: ObjectStoreResource,
) -> dg.MaterializeResult:
    """The month's website-metrics rows counted per country: one row per (probe_cc,
    domain, input) with the daily aggregate's counts plus ``networks`` (distinct
    probe_asn) and ``days`` (distinct UTC days measured), at
    ``exports/website_metrics_monthly/<YYYY-MM>.csv.gz`` and
    ``exports/parquet/website_metrics_monthly/month=<YYYY-MM>/``. Re-exported when any
    of its days' fastpath data version changes."""
    store = object_store.get_store()
    months = list(context.partition_keys)
    with clickhouse.connect() as ch:
        ensure_tables(ch, "fastpath")
        versions = {m: month_version(day_versions(ch, month_days(m))) for m in months}
        if not config.force:
            raise_refusals(refusals_to_shrink(context, store, MONTHLY_KEY, versions, monthly_key))

        def produce(month: str, written: list[Written]) -> None:
            # The month's deduplication, once for both files.
            with staged(ch, MONTHLY_SQL, month_window(month)) as table:
                sql = ordered(table, MONTHLY_COLUMNS, MONTHLY_ORDER)
                rows = int(ch.scalar(f"SELECT count() FROM {table}"))
                csv_sql = ordered_csv(table, MONTHLY_COLUMNS, MONTHLY_ORDER)
                body = ch.stream(csv_sql, fmt="CSV")
                key, level = monthly_key(month), config.gzip_level
                written.append(write_csv(store, key, MONTHLY_COLUMNS, body, level, rows=rows))
                written.append(write_parquet(ch, store, monthly_parquet_key(month), sql, {}, rows))

        publish_partitions(context, ch, store, MONTHLY_KEY, versions, produce)
    return dg.MaterializeResult(metadata={"partitions_in_run": len(months)})


website_metrics_monthly_check = build_objects_check(MONTHLY_KEY, MONTHS)
