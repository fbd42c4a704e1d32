"""The daily consumer exports, one step per day for all of them: the aggregate per
network (``website_metrics_daily``), the per-measurement Parquet
(``website_metrics_parquet``) and every consumer's watchlist (``watchlists/<c>``).

They are one subsettable multi-asset because they read the same deduplicated rows:
the step writes the day's ``website_metrics`` rows to a stage table once (one scan
of ``fastpath``, the costly part), then each selected export is a small query on the
stage. In the UI each is its own asset with its own partitions; a backfill of one
(a newly added consumer, say) runs only it and writes only its objects.
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import dagster as dg
from pydantic import Field

from ooni_pipeline.clickhouse import ClickHouse, ClickHouseResource
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.common import CLICKHOUSE_POOL, OWNER, raise_refusals
from ooni_pipeline.exports import aggregates, parquet, watchlists
from ooni_pipeline.exports.aggregates import DAILY_COLUMNS, DAILY_KEY, DAILY_ORDER
from ooni_pipeline.exports.parquet import WEBSITE_METRICS_PARQUET_KEY
from ooni_pipeline.exports.publish import (
    PartitionObjects,
    Written,
    build_objects_check,
    publishing_partition,
    refusals_to_shrink,
    write_csv,
    write_parquet,
)
from ooni_pipeline.exports.stage import ordered, ordered_csv, staged
from ooni_pipeline.exports.website_metrics import (
    PARTITIONS,
    REEXPORT_WHEN_SOURCE_CHANGED,
    day_window,
)
from ooni_pipeline.exports.website_metrics_sql import CSV_COLUMNS, PIVOT_SQL
from ooni_pipeline.fastpath.assets import FASTPATH_KEY
from ooni_pipeline.fastpath.versions import day_versions
from ooni_pipeline.object_store import ObjectStoreResource
from ooni_pipeline.object_store.stores import ObjectStore


class ConsumerExportConfig(dg.Config):
    gzip_level: int = Field(default=6, ge=1, le=9, description="gzip level of the CSV objects")
    force: bool = Field(
        default=False,
        description="replace published days even when the source now holds under half "
        "the measurements it had when they were written (refused otherwise)",
    )


def _spec(key: dg.AssetKey, kinds: set[str], description: str, **extra: Any) -> dg.AssetSpec:
    return dg.AssetSpec(
        key=key,
        group_name="exports",
        kinds={"clickhouse", "s3", *kinds},
        owners=[OWNER],
        partitions_def=PARTITIONS,
        deps=[FASTPATH_KEY],
        automation_condition=REEXPORT_WHEN_SOURCE_CHANGED,
        description=description,
        **extra,
    )


def _main_keys(consumers: dict[str, tuple[str, ...]]) -> dict[dg.AssetKey, Callable[[str], str]]:
    """Each asset's main object key, by day (protected by the shrink refusal)."""
    keys: dict[dg.AssetKey, Callable[[str], str]] = {
        DAILY_KEY: aggregates.daily_key,
        WEBSITE_METRICS_PARQUET_KEY: parquet.parquet_key,
    }
    for consumer in consumers:
        keys[watchlists.asset_key(consumer)] = lambda d, c=consumer: watchlists.object_key(c, d)
    return keys


def _daily_aggregate(
    ch: ClickHouse, store: ObjectStore, stage: str, day: str, level: int, written: list[Written]
) -> None:
    with staged(ch, aggregates.daily_sql(stage), {}) as table:
        sql = ordered(table, DAILY_COLUMNS, DAILY_ORDER)
        rows = int(ch.scalar(f"SELECT count() FROM {table}"))
        key = aggregates.daily_key(day)
        body = ch.stream(ordered_csv(table, DAILY_COLUMNS, DAILY_ORDER))
        written.append(write_csv(store, key, DAILY_COLUMNS, body, level, rows=rows))
        written.append(write_parquet(ch, store, aggregates.daily_parquet_key(day), sql, {}, rows))


def _watchlists(
    ch: ClickHouse,
    store: ObjectStore,
    stage: str,
    day: str,
    level: int,
    lists: dict[str, tuple[str, ...]],
    consumers: list[str],
    written: PartitionObjects,
) -> None:
    """Every selected consumer's object of the day, from one query on the stage
    (staged, so each consumer's rows are counted apart from its stream); a consumer
    without rows gets a header-only object."""
    params = watchlists.pair_params(lists, consumers)
    with staged(ch, watchlists.watchlist_sql(stage), params) as matched:
        counts = {
            int(index): int(n)
            for index, n in ch.query_rows(
                f"SELECT consumer, count() FROM {matched} GROUP BY consumer"
            )
        }
        body = ch.stream(f"SELECT * FROM {matched} ORDER BY {watchlists.ROW_ORDER}", fmt="CSV")

        def publish(index: int, records: Iterable[bytes]) -> None:
            consumer = watchlists.asset_key(consumers[index])
            key = watchlists.object_key(consumers[index], day)
            written[consumer].append(
                write_csv(store, key, CSV_COLUMNS, records, level, counts.get(index, 0))
            )
            written.finish(consumer)

        streamed = set()
        for index, records in watchlists.by_consumer(body):
            publish(index, records)
            streamed.add(index)
        for index in range(len(consumers)):
            if index not in streamed:  # no rows: a header-only object (its count must be 0)
                publish(index, [])


def build_daily_consumer_exports(
    lists: dict[str, tuple[str, ...]],
) -> tuple[dg.AssetsDefinition, list[dg.AssetChecksDefinition]]:
    """The multi-asset of the daily consumer exports with ``lists``' watchlists
    (consumer -> domains), and the assets' checks."""
    specs = [
        _spec(
            DAILY_KEY,
            {"csv", "parquet"},
            "The day's website-metrics rows counted per network: one row per (probe_cc, "
            "probe_asn, domain, input) with measurement_count, one count per category and "
            "confirmed, at exports/website_metrics_daily/<YYYY-MM-DD>.csv.gz and "
            "exports/parquet/website_metrics_daily/day=<YYYY-MM-DD>/. Re-exported when "
            "the day's fastpath data version changes.",
        ),
        _spec(
            WEBSITE_METRICS_PARQUET_KEY,
            {"parquet"},
            "The day's website_metrics rows (same columns, same order) as one Parquet file "
            "in a Hive layout, exports/parquet/website_metrics/day=<YYYY-MM-DD>/, written "
            "by ClickHouse. Re-exported when the day's fastpath data version changes.",
        ),
        *(
            _spec(
                watchlists.asset_key(consumer),
                {"csv"},
                f"The website_metrics rows of {consumer}'s domains and their subdomains, "
                f"at exports/watchlists/{consumer}/<YYYY-MM-DD>.csv.gz (watchlist file: "
                f"${watchlists.WATCHLISTS_ENV}).",
                metadata={"domains": dg.MetadataValue.json(list(domains))},
            )
            for consumer, domains in lists.items()
        ),
    ]
    main_keys = _main_keys(lists)

    @dg.multi_asset(
        name="consumer_exports_daily",
        specs=specs,
        can_subset=True,
        pool=CLICKHOUSE_POOL,
        # One run over a backfill's days (the UI, or --partition-range in a shell),
        # each day recorded as it is published.
        backfill_policy=dg.BackfillPolicy.single_run(),
    )
    def consumer_exports_daily(
        context: dg.AssetExecutionContext,
        config: ConsumerExportConfig,
        clickhouse: ClickHouseResource,
        object_store: ObjectStoreResource,
    ) -> Iterator[dg.MaterializeResult]:
        """The selected daily consumer exports of each day of the run, from one stage
        of the day's website_metrics rows."""
        store = object_store.get_store()
        days = list(context.partition_keys)
        selected = [key for key in main_keys if key in context.selected_asset_keys]
        consumers = [c for c in lists if watchlists.asset_key(c) in context.selected_asset_keys]
        with clickhouse.connect() as ch:
            ensure_tables(ch, "fastpath")
            versions = day_versions(ch, days)
            if not config.force:
                raise_refusals(
                    [
                        refusal
                        for key in selected
                        for refusal in refusals_to_shrink(
                            context, store, key, versions, main_keys[key]
                        )
                    ]
                )
            for day in days:
                version, level = versions[day], config.gzip_level
                with (
                    publishing_partition(context, ch, store, day, version, selected) as written,
                    staged(ch, PIVOT_SQL, day_window(day)) as stage,
                ):
                    if DAILY_KEY in selected:
                        _daily_aggregate(ch, store, stage, day, level, written[DAILY_KEY])
                        written.finish(DAILY_KEY)
                    if WEBSITE_METRICS_PARQUET_KEY in selected:
                        key, sql = parquet.parquet_key(day), parquet.parquet_sql(stage)
                        rows = int(ch.scalar(f"SELECT count() FROM {stage}"))
                        written[WEBSITE_METRICS_PARQUET_KEY].append(
                            write_parquet(ch, store, key, sql, {}, rows)
                        )
                        written.finish(WEBSITE_METRICS_PARQUET_KEY)
                    if consumers:
                        _watchlists(ch, store, stage, day, level, lists, consumers, written)
        for key in selected:
            yield dg.MaterializeResult(asset_key=key, metadata={"partitions_in_run": len(days)})

    checks = [
        build_objects_check(DAILY_KEY, PARTITIONS),
        build_objects_check(WEBSITE_METRICS_PARQUET_KEY, PARTITIONS),
        *(build_objects_check(watchlists.asset_key(c), PARTITIONS) for c in lists),
    ]
    return consumer_exports_daily, checks
