"""``fastpath``, the table of scored measurements, as part of the graph.

- ``fastpath`` stands for the table (daily partitions by UTC day of
  ``measurement_start_time``). It is observed, never materialized: an observation
  records each day's data version, and only when it moved, so downstream exports
  re-run exactly for the days whose rows changed.
- ``public_fastpath`` (``OONI_FASTPATH_SOURCE=public``, the default) fills the table
  from OONI's open bucket, one upload day per partition, and records the data
  versions of the measurement days it touched.
"""

from typing import Any

import dagster as dg
from dagster._core.definitions.data_version import DATA_VERSION_TAG
from pydantic import Field

from ooni_pipeline import settings
from ooni_pipeline.clickhouse import ClickHouse, ClickHouseResource
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.common import CLICKHOUSE_POOL, OWNER, one_run_at_a_time, run_liveness
from ooni_pipeline.fastpath.ingest import (
    DEFAULT_MAX_MALFORMED_SHARE,
    DEFAULT_MAX_POSTCAN_BYTES,
    IngestReport,
    drop_scratch_tables,
    ingest_upload_day,
)
from ooni_pipeline.fastpath.public_bucket import (
    DEFAULT_BUCKET,
    PublicBucket,
    parse_countries,
    parse_test_names,
)
from ooni_pipeline.fastpath.versions import day_versions, measurements

FASTPATH_KEY = dg.AssetKey("fastpath")
PUBLIC_FASTPATH_KEY = dg.AssetKey("public_fastpath")
MEASUREMENT_DAYS = dg.DailyPartitionsDefinition(start_date="2016-01-01", timezone="UTC")
# The bucket's raw/ layout starts on 2020-10-21.
UPLOAD_DAYS = dg.DailyPartitionsDefinition(start_date="2020-10-21", timezone="UTC")
SOURCES = ("public", "external")

# What public_fastpath reads, written outside Dagster by OONI's measurement uploader.
ooni_measurement_bucket = dg.AssetSpec(
    "ooni_measurement_bucket",
    group_name="fastpath",
    description=(
        "OONI's open measurement bucket (`OONI_PUBLIC_BUCKET`, default `ooni-data-eu-fra`): "
        "every raw measurement as postcans under `raw/YYYYMMDD/HH/CC/<test>/`, uploaded by "
        "OONI's API (ooni/backend `api/ooni_api_uploader.py`). Read anonymously."
    ),
    kinds={"s3"},
    owners=[OWNER],
    # with_source_code_references links assets to their functions; a spec has none.
    metadata={
        "dagster/code_references": dg.CodeReferencesMetadataValue(
            code_references=[dg.LocalFileCodeReference(file_path=__file__, line_number=1)]
        )
    },
)


def fastpath_source() -> str:
    """``OONI_FASTPATH_SOURCE``: who writes the table (read when the code location loads)."""
    source = (settings.env("OONI_FASTPATH_SOURCE") or "public").lower()
    if source not in SOURCES:
        raise ValueError(f"OONI_FASTPATH_SOURCE must be one of {SOURCES}, got {source!r}")
    return source


def public_bucket() -> PublicBucket:
    return PublicBucket(
        bucket=settings.env("OONI_PUBLIC_BUCKET") or DEFAULT_BUCKET,
        endpoint_url=settings.env("OONI_PUBLIC_ENDPOINT_URL"),
        countries=parse_countries(settings.env("OONI_PUBLIC_COUNTRIES")),
        test_names=parse_test_names(settings.env("OONI_PUBLIC_TEST_NAMES")),
    )


def record_day_versions(
    context: dg.OpExecutionContext | dg.AssetExecutionContext, ch: ClickHouse, days: list[str]
) -> dict[str, str]:
    """Observe ``fastpath`` for these measurement days: log an observation with the
    new data version of each day whose version differs from the last one recorded.
    Returns the changed days and their versions.

    Only changes are logged, because every observation of an observable asset counts
    as an update for declarative automation, whatever its version.
    """
    days = sorted(day for day in set(days) if MEASUREMENT_DAYS.has_partition_key(day))
    changed: dict[str, str] = {}
    for day, version in day_versions(ch, days).items():
        record = context.instance.get_latest_data_version_record(
            FASTPATH_KEY, is_source=True, partition_key=day
        )
        previous = (
            record.asset_observation.tags.get(DATA_VERSION_TAG)
            if record and record.asset_observation
            else None
        )
        if previous == version or (previous is None and version == "0"):
            continue
        changed[day] = version
        measured = measurements(version)
        context.log_event(
            dg.AssetObservation(
                asset_key=FASTPATH_KEY,
                partition=day,
                tags={DATA_VERSION_TAG: version},
                metadata={
                    "web_connectivity_measurements": measured,
                    "previous_version": previous or "",
                },
            )
        )
    if changed:
        context.log.info(
            f"fastpath data version changed for {len(changed)} day(s): {', '.join(changed)}"
        )
    return changed


def build_fastpath_asset(source: str) -> dg.AssetsDefinition:
    deps = (
        [
            dg.AssetDep(
                PUBLIC_FASTPATH_KEY,
                partition_mapping=dg.TimeWindowPartitionMapping(
                    start_offset=0, end_offset=1, allow_nonexistent_upstream_partitions=True
                ),
            )
        ]
        if source == "public"
        else []
    )
    writer = (
        "`public_fastpath` (OONI's open bucket)"
        if source == "public"
        else "OONI's fastpath service"
    )

    @dg.multi_observable_source_asset(
        name="fastpath",
        specs=[
            dg.AssetSpec(
                FASTPATH_KEY,
                deps=deps,
                group_name="fastpath",
                description=(
                    "ClickHouse table `fastpath`: one scored row per measurement, written by "
                    f"{writer}. Partitioned by UTC day of `measurement_start_time`; each "
                    "observation records a day's data version (web_connectivity measurements "
                    "and newest `update_time`), logged only when it changed."
                ),
                kinds={"clickhouse"},
                owners=[OWNER],
                skippable=True,
            )
        ],
        partitions_def=MEASUREMENT_DAYS,
    )
    def fastpath(context: dg.AssetExecutionContext, clickhouse: ClickHouseResource):
        # One grouped query over the run's days (the schedule observes the last week).
        days = list(context.partition_keys)
        with clickhouse.connect() as ch:
            ensure_tables(ch, "fastpath")
            changed = record_day_versions(context, ch, days)
        context.log.info(f"observed {len(days)} day(s), {len(changed)} changed")
        yield from ()

    # The observation opens ClickHouse: it takes its turn in the pool like every step
    # that does (multi_observable_source_asset has no pool argument in 1.13).
    fastpath.op._pool = CLICKHOUSE_POOL  # noqa: SLF001
    return fastpath


class PublicFastpathConfig(dg.Config):
    max_malformed_share: float = Field(
        default=DEFAULT_MAX_MALFORMED_SHARE,
        ge=0,
        le=1,
        description="Fail the upload day when more than this share of members is malformed",
    )
    max_postcan_unpacked_bytes: int = Field(
        default=DEFAULT_MAX_POSTCAN_BYTES,
        gt=0,
        description="Fail the upload day when a postcan unpacks to more than this many bytes "
        "(OONI's are about 20 MB of gzip, some 60 MB unpacked)",
    )


@dg.asset(
    key=PUBLIC_FASTPATH_KEY,
    group_name="fastpath",
    kinds={"clickhouse", "s3"},
    owners=[OWNER],
    pool=CLICKHOUSE_POOL,
    partitions_def=UPLOAD_DAYS,
    deps=[ooni_measurement_bucket, "fingerprints_dns", "fingerprints_http"],
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=7),
)
def public_fastpath(
    context: dg.AssetExecutionContext,
    config: PublicFastpathConfig,
    clickhouse: ClickHouseResource,
) -> dg.MaterializeResult:
    """Rows of table `fastpath` from one upload day of OONI's open bucket
    (`raw/YYYYMMDD/`, the day OONI *received* them), for `OONI_PUBLIC_COUNTRIES`
    (empty: all) and `OONI_PUBLIC_TEST_NAMES` (default web_connectivity). ClickHouse
    reads the postcans from S3 and scores each measurement as OONI's fastpath does,
    with the fingerprint tables; a corrupt postcan, one that unpacks past
    `max_postcan_unpacked_bytes` (default 1 GiB), or more than 1% malformed members
    fails the day with nothing written. Re-running a day writes only changed rows.
    """
    bucket = public_bucket()
    reports: list[IngestReport] = []
    with clickhouse.connect() as ch:
        ensure_tables(ch, "fastpath", "fingerprints_dns", "fingerprints_http")
        fingerprint_rows = {t: ch.count(t) for t in ("fingerprints_dns", "fingerprints_http")}
        if not all(fingerprint_rows.values()):
            context.log.warning(
                f"fingerprint tables are empty ({fingerprint_rows}): nothing can be confirmed. "
                "Materialize fingerprints_dns and fingerprints_http first."
            )
        dropped = drop_scratch_tables(ch, run_liveness(context))
        if dropped:
            context.log.info(f"dropped {len(dropped)} scratch tables of ended runs: {dropped}")
        for day in context.partition_keys:
            # Two runs of one upload day (a backfill beside the schedule) take turns.
            with one_run_at_a_time(context, ch, f"public_fastpath_{day.replace('-', '')}"):
                report = ingest_upload_day(
                    ch,
                    bucket,
                    day,
                    max_malformed_share=config.max_malformed_share,
                    max_postcan_bytes=config.max_postcan_unpacked_bytes,
                    log=context.log.info,
                    run_id=context.run.run_id,
                )
            changed = record_day_versions(context, ch, report.measurement_days)
            context.add_asset_metadata(_day_metadata(report, changed), partition_key=day)
            reports.append(report)
    return dg.MaterializeResult(
        metadata={
            "bucket": bucket.base_url,
            "countries": ",".join(bucket.countries) or "all",
            "test_names": ",".join(bucket.test_names),
            "fingerprints_dns_rows": fingerprint_rows["fingerprints_dns"],
            "fingerprints_http_rows": fingerprint_rows["fingerprints_http"],
        }
    )


def _day_metadata(report: IngestReport, changed: dict[str, str]) -> dict[str, Any]:
    throughput = report.members / report.duration_s if report.duration_s else 0.0
    examples = [e for reason in sorted(report.examples) for e in report.examples[reason]]
    return {
        "dagster/row_count": report.inserted,
        "postcans": report.postcans,
        "compressed_bytes": report.compressed_bytes,
        "members": report.members,
        "scored": report.scored,
        "skipped": dg.MetadataValue.json(report.skipped),
        "malformed": report.malformed,
        "skip_examples": dg.MetadataValue.json(examples),
        "measurement_days_changed": dg.MetadataValue.json(sorted(changed)),
        "live_rows_read_estimate": report.live_rows_read_estimate,
        "duration_s": round(report.duration_s, 3),
        "measurements_per_s": round(throughput, 1),
    }
