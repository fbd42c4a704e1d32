"""The per-measurement website-metrics table as Parquet, in a Hive layout.

``exports/parquet/website_metrics/day=<YYYY-MM-DD>/website_metrics_<YYYY-MM-DD>.parquet``:
the rows and columns of the ``website_metrics`` CSV of the same day, written by
ClickHouse, so that one glob (``day=2024-03-*/*.parquet``) reads a month in DuckDB,
pandas or Spark, with ``day`` as a column.
"""

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
    write_parquet,
)
from ooni_pipeline.exports.website_metrics import (
    PARTITIONS,
    REEXPORT_WHEN_SOURCE_CHANGED,
    day_window,
)
from ooni_pipeline.exports.website_metrics_sql import CSV_COLUMNS, PIVOT_SQL
from ooni_pipeline.fastpath.assets import FASTPATH_KEY
from ooni_pipeline.fastpath.versions import day_versions
from ooni_pipeline.object_store import ObjectStoreResource

WEBSITE_METRICS_PARQUET_KEY = dg.AssetKey("website_metrics_parquet")


def parquet_key(day: str) -> str:
    return f"exports/parquet/website_metrics/day={day}/website_metrics_{day}.parquet"


class ParquetExportConfig(dg.Config):
    force: bool = Field(
        default=False,
        description="replace published days even when the source now holds under half "
        "the measurements it had when they were written (refused otherwise)",
    )


@dg.asset(
    key=WEBSITE_METRICS_PARQUET_KEY,
    group_name="exports",
    kinds={"clickhouse", "s3", "parquet"},
    owners=[OWNER],
    pool=CLICKHOUSE_POOL,
    partitions_def=PARTITIONS,
    deps=[FASTPATH_KEY],
    automation_condition=REEXPORT_WHEN_SOURCE_CHANGED,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=31),
)
def website_metrics_parquet(
    context: dg.AssetExecutionContext,
    config: ParquetExportConfig,
    clickhouse: ClickHouseResource,
    object_store: ObjectStoreResource,
) -> dg.MaterializeResult:
    """The day's ``website_metrics`` rows as one Parquet file in a Hive layout
    (``exports/parquet/website_metrics/day=<YYYY-MM-DD>/``), written by ClickHouse
    from the same query as the CSV. Re-exported when the day's fastpath data
    version changes."""
    store = object_store.get_store()
    days = list(context.partition_keys)
    with clickhouse.connect() as ch:
        ensure_tables(ch, "fastpath")
        versions = day_versions(ch, days)
        if not config.force:
            raise_refusals(
                refusals_to_shrink(
                    context, store, WEBSITE_METRICS_PARQUET_KEY, versions, parquet_key
                )
            )

        def produce(day: str) -> list[Written]:
            return [write_parquet(ch, store, parquet_key(day), PIVOT_SQL, day_window(day))]

        publish_partitions(context, ch, store, WEBSITE_METRICS_PARQUET_KEY, versions, produce)
    return dg.MaterializeResult(metadata={"partitions_in_run": len(days)})


website_metrics_parquet_check = build_objects_check(
    WEBSITE_METRICS_PARQUET_KEY, {"parquet": CSV_COLUMNS}
)
