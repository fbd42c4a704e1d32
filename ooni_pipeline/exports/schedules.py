"""Daily export of yesterday, re-exporting the days before it: probes upload late."""

from datetime import timedelta

import dagster as dg

from ooni_pipeline import settings
from ooni_pipeline.common import NETWORK_RETRY_POLICY
from ooni_pipeline.exports.website_metrics import website_metrics

DEFAULT_LOOKBACK_DAYS = 7

website_metrics_job = dg.define_asset_job(
    "website_metrics_job",
    selection=dg.AssetSelection.assets(website_metrics),
    op_retry_policy=NETWORK_RETRY_POLICY,
)


def lookback_days() -> int:
    """Days re-exported by each tick (``OONI_WEBSITE_METRICS_LOOKBACK_DAYS``, default 7)."""
    value = settings.env("OONI_WEBSITE_METRICS_LOOKBACK_DAYS", str(DEFAULT_LOOKBACK_DAYS))
    days = int(value)
    if days < 1:
        raise ValueError(f"OONI_WEBSITE_METRICS_LOOKBACK_DAYS must be at least 1, got {value!r}")
    return days


@dg.schedule(
    name="website_metrics_schedule",
    job=website_metrics_job,
    cron_schedule="0 1 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="At 01:00 UTC, export yesterday and re-export the days before it, in one run.",
)
def website_metrics_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    today = context.scheduled_execution_time.date()
    last = today - timedelta(days=1)
    first = today - timedelta(days=lookback_days())
    first_key, last_key = f"{first:%Y-%m-%d}", f"{last:%Y-%m-%d}"
    return dg.RunRequest(
        run_key=f"website_metrics {first_key}..{last_key}",
        tags={
            "dagster/asset_partition_range_start": first_key,
            "dagster/asset_partition_range_end": last_key,
        },
    )
