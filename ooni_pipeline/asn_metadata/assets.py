"""The ``asnmeta`` asset: AS number to organisation history, in ClickHouse."""

import time

import dagster as dg
from pydantic import Field

from ooni_pipeline import settings
from ooni_pipeline.asn_metadata import DEFAULT_BATCH_ROWS
from ooni_pipeline.clickhouse import ClickHouseResource
from ooni_pipeline.clickhouse.schema import ensure_tables, ensure_updater_table
from ooni_pipeline.clickhouse.swap import replace_table
from ooni_pipeline.common import (
    CLICKHOUSE_POOL,
    OWNER,
    TableUpdateConfig,
    column_schema_metadata,
    one_run_at_a_time,
    previous_validators,
    unchanged_result,
    validators_metadata,
)
from ooni_pipeline.fetch import fetch

ASNMETA_KEY = dg.AssetKey("asnmeta")


class AsnmetaConfig(TableUpdateConfig):
    min_rows_exclusive: int = 100_000
    max_rows_exclusive: int = 1_000_000
    batch_rows: int = Field(
        default=DEFAULT_BATCH_ROWS, description="rows per insert; bounds memory"
    )


@dg.asset(
    key=ASNMETA_KEY,
    group_name="asn_metadata",
    kinds={"json", "http", "clickhouse"},
    owners=[OWNER],
    pool=CLICKHOUSE_POOL,
)
def asnmeta(
    context: dg.AssetExecutionContext, config: AsnmetaConfig, clickhouse: ClickHouseResource
) -> dg.MaterializeResult:
    """Who runs each autonomous system, and since when: the AS-to-organisation history
    published for OONI (``OONI_ASNMETA_URL``) as rows ``(asn, org_name, cc, changed,
    aut_name, source)`` in the ClickHouse table ``asnmeta``, which the API serves.
    Streamed and inserted in batches (memory does not grow with the file), validated
    (ASN, five fields, dates), bounded (an empty ``{}`` fails), filled into
    ``asnmeta_tmp`` and swapped in atomically. An unchanged source skips the rewrite.
    """
    # The parser (numpy, pyarrow) loads with the run, not with the code location.
    from ooni_pipeline.asn_metadata.load import load_asnmeta
    from ooni_pipeline.asn_metadata.parse import ParseStats

    url = settings.env("OONI_ASNMETA_URL", settings.DEFAULT_ASNMETA_URL)
    start = time.monotonic()
    stats = ParseStats()
    with clickhouse.connect() as ch, one_run_at_a_time(context, ch, "asnmeta"):
        ensure_updater_table(ch, "asnmeta")
        live_rows = ch.count("asnmeta")
        previous = (
            None if config.force or not live_rows else previous_validators(context, ASNMETA_KEY)
        )
        with fetch(url, previous=previous) as fetched:
            if fetched.not_modified:
                return unchanged_result(
                    context,
                    fetched.validators.describe(),
                    f"source unchanged since the last materialization (HTTP 304 from {url})",
                    live_rows,
                    fetch_s=round(time.monotonic() - start, 3),
                    **validators_metadata(fetched.validators),
                )
            result = replace_table(
                ch,
                live="asnmeta",
                staging="asnmeta_tmp",
                fill=lambda ch, staging: load_asnmeta(
                    fetched, ch, staging, stats, config.batch_rows, context.log
                ),
                bounds=config.bounds(),
            )
            validators = fetched.validators
        schema = column_schema_metadata(ch, "asnmeta")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(validators.describe()),
        metadata={
            "skipped": False,
            "dagster/row_count": result.rows,
            "previous_rows": result.previous_rows,
            "distinct_asns": stats.asns,
            "newest_changed": str(stats.newest_changed or ""),
            "bytes_fetched": stats.bytes_read,
            "fetch_and_load_s": round(result.fill_s, 3),
            "swap_s": round(result.swap_s, 3),
            "duration_s": round(time.monotonic() - start, 3),
            **validators_metadata(validators),
            **schema,
        },
    )


@dg.asset_check(
    asset=asnmeta,
    pool=CLICKHOUSE_POOL,
    description="``asnmeta`` holds rows, and no ASN has a history entry dated in the future.",
)
def asnmeta_rows_check(clickhouse: ClickHouseResource) -> dg.AssetCheckResult:
    with clickhouse.connect() as ch:
        ensure_tables(ch, "asnmeta")
        rows, asns, future = ch.query_rows(
            "SELECT count(), uniqExact(asn), countIf(changed > today() + 1) FROM asnmeta"
        )[0]
    return dg.AssetCheckResult(
        passed=bool(rows > 0 and future == 0),
        metadata={"rows": rows, "distinct_asns": asns, "future_dates": future},
    )
