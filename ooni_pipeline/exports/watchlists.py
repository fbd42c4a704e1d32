"""Watchlists: each consumer's own daily ``website_metrics``, only its domains.

One asset per consumer of the watchlist file (``OONI_WATCHLISTS``, see
``watchlist_file``), ``watchlists/<consumer>``, daily partitioned, writing
``exports/watchlists/<consumer>/<YYYY-MM-DD>.csv.gz`` with exactly the
``website_metrics`` columns and rows (its query is the inner query here).

The assets are one subsettable multi-asset: a day's run of every consumer is one
scan of the day (rows are matched against all consumers' domains at once, then
split by consumer), while a new consumer, backfilled on its own in the UI, is a
run selecting only its asset, which writes only its objects.
"""

import itertools
from collections.abc import Iterator

import dagster as dg
from pydantic import Field

from ooni_pipeline import settings
from ooni_pipeline.clickhouse import ClickHouseResource
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.common import CLICKHOUSE_POOL, OWNER, raise_refusals
from ooni_pipeline.exports.manifest import manifest_entry, record_exports
from ooni_pipeline.exports.publish import (
    CsvRecords,
    build_objects_check,
    objects_metadata,
    refusals_to_shrink,
    write_csv,
)
from ooni_pipeline.exports.watchlist_file import load_watchlists
from ooni_pipeline.exports.website_metrics import (
    PARTITIONS,
    REEXPORT_WHEN_SOURCE_CHANGED,
    day_window,
)
from ooni_pipeline.exports.website_metrics_sql import CSV_COLUMNS, PIVOT_SQL
from ooni_pipeline.fastpath.assets import FASTPATH_KEY
from ooni_pipeline.fastpath.versions import day_versions
from ooni_pipeline.object_store import ObjectStoreResource

WATCHLISTS_ENV = "OONI_WATCHLISTS"
KEY_PREFIX = "watchlists"

# The website_metrics rows whose domain is, or is under, a watched domain, once per
# consumer watching it (bound: start, end; pairs of consumer index and domain, as
# comma-separated lists: a validated domain holds no comma, and a plain String
# binds alike on both back ends).
# Label by label: "bbc.com" matches "news.bbc.com", never "notbbc.com".
WATCHLIST_SQL = f"""
SELECT consumer, {", ".join(f"`{c}`" for c in CSV_COLUMNS)}
FROM ({PIVOT_SQL})
ARRAY JOIN arrayDistinct(arrayFilter(
    (c, d) -> lower(domain) = d OR endsWith(lower(domain), concat('.', d)),
    arrayMap(i -> toUInt32(i), splitByChar(',', {{consumers:String}})),
    splitByChar(',', {{domains:String}})
)) AS consumer
ORDER BY consumer, measurement_start_time, explorer_url
"""


def asset_key(consumer: str) -> dg.AssetKey:
    return dg.AssetKey([KEY_PREFIX, consumer])


def object_key(consumer: str, day: str) -> str:
    return f"exports/watchlists/{consumer}/{day}.csv.gz"


class WatchlistsConfig(dg.Config):
    gzip_level: int = Field(default=6, ge=1, le=9, description="gzip level of the objects")
    force: bool = Field(
        default=False,
        description="replace published days even when the source now holds under half "
        "the measurements it had when they were written (refused otherwise)",
    )


def _by_consumer(chunks: Iterator[bytes]) -> Iterator[tuple[int, Iterator[bytes]]]:
    """(consumer index, its CSV records without the index column), in order."""
    records = CsvRecords.split(chunks)
    split = ((int(r[: r.index(b",")]), r[r.index(b",") + 1 :]) for r in records)
    for index, group in itertools.groupby(split, key=lambda pair: pair[0]):
        yield index, (record for _, record in group)


def build_watchlists(
    watchlists: dict[str, tuple[str, ...]],
) -> tuple[list[dg.AssetsDefinition], list[dg.AssetChecksDefinition]]:
    """The watchlist multi-asset and its checks (nothing when no consumer)."""
    if not watchlists:
        return [], []
    specs = [
        dg.AssetSpec(
            key=asset_key(consumer),
            group_name="exports",
            kinds={"clickhouse", "s3", "csv"},
            owners=[OWNER],
            partitions_def=PARTITIONS,
            deps=[FASTPATH_KEY],
            automation_condition=REEXPORT_WHEN_SOURCE_CHANGED,
            description=f"website_metrics rows of {consumer}'s domains and their subdomains, "
            f"at exports/watchlists/{consumer}/<YYYY-MM-DD>.csv.gz",
            metadata={"domains": dg.MetadataValue.json(list(domains))},
        )
        for consumer, domains in watchlists.items()
    ]

    @dg.multi_asset(
        name="watchlists",
        specs=specs,
        can_subset=True,
        pool=CLICKHOUSE_POOL,
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=31),
    )
    def watchlists_asset(
        context: dg.AssetExecutionContext,
        config: WatchlistsConfig,
        clickhouse: ClickHouseResource,
        object_store: ObjectStoreResource,
    ) -> Iterator[dg.MaterializeResult]:
        """Each selected consumer's rows of the day, from one query."""
        store = object_store.get_store()
        days = list(context.partition_keys)
        selected = [c for c in watchlists if asset_key(c) in context.selected_asset_keys]
        pairs = [(i, d) for i, c in enumerate(selected) for d in watchlists[c]]
        with clickhouse.connect() as ch:
            ensure_tables(ch, "fastpath")
            versions = day_versions(ch, days)
            if not config.force:
                raise_refusals(
                    [
                        refusal
                        for c in selected
                        for refusal in refusals_to_shrink(
                            context, store, asset_key(c), versions, lambda d, c=c: object_key(c, d)
                        )
                    ]
                )
            for day in days:
                params = day_window(day) | {
                    "consumers": ",".join(str(i) for i, _ in pairs),
                    "domains": ",".join(d for _, d in pairs),
                }
                written = {}
                body = ch.stream(WATCHLIST_SQL, params, fmt="CSV")
                for index, records in _by_consumer(body):
                    consumer = selected[index]
                    written[consumer] = write_csv(
                        store, object_key(consumer, day), CSV_COLUMNS, records, config.gzip_level
                    )
                for consumer in selected:
                    if consumer not in written:  # no rows: a header-only object
                        written[consumer] = write_csv(
                            store, object_key(consumer, day), CSV_COLUMNS, [], config.gzip_level
                        )
                    context.add_asset_metadata(
                        objects_metadata([written[consumer]], versions[day]),
                        asset_key=asset_key(consumer),
                        partition_key=day,
                    )
                    record_exports(
                        context,
                        ch,
                        store,
                        asset_key(consumer),
                        {
                            written[consumer].key: manifest_entry(
                                written[consumer], asset_key(consumer), day, versions[day]
                            )
                        },
                    )
                context.log.info(
                    f"watchlists {day}: "
                    + ", ".join(f"{c} {written[c].rows} rows" for c in selected)
                )
        for consumer in selected:
            yield dg.MaterializeResult(
                asset_key=asset_key(consumer), metadata={"partitions_in_run": len(days)}
            )

    checks = [build_objects_check(asset_key(c), {"csv.gz": CSV_COLUMNS}) for c in watchlists]
    return [watchlists_asset], checks


def watchlists_from_env() -> tuple[list[dg.AssetsDefinition], list[dg.AssetChecksDefinition]]:
    """The watchlist assets of ``$OONI_WATCHLISTS`` (none when unset). Read when the
    code location loads: a wrong file fails the load, naming file and line."""
    path = settings.env(WATCHLISTS_ENV)
    return build_watchlists(load_watchlists(path)) if path else ([], [])
