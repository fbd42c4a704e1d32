"""Yesterday's export on time; later changes re-export through the asset's automation."""

from datetime import timedelta
from typing import Any

import dagster as dg

from ooni_pipeline.common import RETRIED, launching_sensor_status, schedule_status
from ooni_pipeline.exports.website_metrics import website_metrics

website_metrics_job = dg.define_asset_job(
    "website_metrics_job",
    selection=dg.AssetSelection.assets(website_metrics),
    tags=RETRIED,
)


def previous_day_schedule(
    name: str, job: Any, cron: str, description: str, run_key: str
) -> dg.ScheduleDefinition:
    """A schedule requesting yesterday's partition of ``job`` (an asset job), once per day
    (run key ``<run_key> <day>``): a daily export on time."""

    @dg.schedule(
        name=name,
        job=job,
        cron_schedule=cron,
        execution_timezone="UTC",
        default_status=schedule_status(),
        description=description,
    )
    def _schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        day = f"{context.scheduled_execution_time.date() - timedelta(days=1):%Y-%m-%d}"
        return dg.RunRequest(run_key=f"{run_key} {day}", partition_key=day)

    return _schedule


website_metrics_schedule = previous_day_schedule(
    "website_metrics_schedule",
    website_metrics_job,
    "0 1 * * *",
    "At 01:00 UTC, export yesterday. Days whose fastpath data version changes "
    "later (late uploads) are re-exported by website_metrics_automation_sensor.",
    run_key="website_metrics",
)


website_metrics_automation_sensor = dg.AutomationConditionSensorDefinition(
    "website_metrics_automation_sensor",
    target=dg.AssetSelection.assets(website_metrics),
    default_status=launching_sensor_status(),
    minimum_interval_seconds=60,
    description="Re-exports each website_metrics day whose fastpath data version changed.",
)
