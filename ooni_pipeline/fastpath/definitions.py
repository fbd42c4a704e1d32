"""The ``fastpath`` domain: the observed table and, in public mode, its builder.

``OONI_FASTPATH_SOURCE`` is read when the code location loads: ``public`` (default)
adds ``public_fastpath``; ``external`` leaves the table to OONI's fastpath service.
"""

from datetime import timedelta

import dagster as dg

from ooni_pipeline import settings
from ooni_pipeline.common import NOT_RETRIED, RETRIED, schedule_status
from ooni_pipeline.fastpath.assets import (
    FASTPATH_KEY,
    build_fastpath_asset,
    fastpath_source,
    ooni_measurement_bucket,
    public_fastpath,
)

OBSERVED_DAYS = 7

SOURCE = fastpath_source()
fastpath = build_fastpath_asset(SOURCE)

# Not retried: the next hour's observation is the retry (a failing streak alerts once).
fastpath_observation_job = dg.define_asset_job(
    "fastpath_observation_job", selection=dg.AssetSelection.assets(FASTPATH_KEY), tags=NOT_RETRIED
)


@dg.schedule(
    name="fastpath_observation_schedule",
    job=fastpath_observation_job,
    cron_schedule="40 * * * *",
    execution_timezone="UTC",
    default_status=schedule_status(),
    description="Every hour, observe the data versions of the last 7 complete days of fastpath "
    "(late uploads land there); only days that changed get an observation.",
)
def fastpath_observation_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    today = context.scheduled_execution_time.date()
    first, last = today - timedelta(days=OBSERVED_DAYS), today - timedelta(days=1)
    return dg.RunRequest(
        run_key=None,
        tags={
            "dagster/asset_partition_range_start": f"{first:%Y-%m-%d}",
            "dagster/asset_partition_range_end": f"{last:%Y-%m-%d}",
        },
    )


assets: list = [fastpath]
schedules: list = [fastpath_observation_schedule]
if SOURCE == "public":
    public_fastpath_job = dg.define_asset_job(
        "public_fastpath_job",
        selection=dg.AssetSelection.assets(public_fastpath),
        tags=RETRIED,
    )
    # Opt-in: running by default only when OONI_PUBLIC_COUNTRIES narrows the download;
    # ingesting every country (gigabytes a day) is switched on in the UI.
    schedules.append(
        dg.build_schedule_from_partitioned_job(
            public_fastpath_job,
            name="public_fastpath_schedule",
            hour_of_day=0,
            minute_of_hour=30,
            default_status=schedule_status(running=bool(settings.env("OONI_PUBLIC_COUNTRIES"))),
            description="At 00:30 UTC, ingest yesterday's upload day from OONI's open bucket.",
        )
    )
    assets.extend([ooni_measurement_bucket, public_fastpath])

defs = dg.Definitions(assets=assets, schedules=schedules, jobs=[fastpath_observation_job])
