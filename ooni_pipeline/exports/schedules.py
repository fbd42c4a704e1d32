"""Yesterday's export on time; later changes re-export through the asset's automation."""

from datetime import timedelta

import dagster as dg

from ooni_pipeline.common import NETWORK_RETRY_POLICY, launching_sensor_status, schedule_status
from ooni_pipeline.exports.website_metrics import website_metrics

website_metrics_job = dg.define_asset_job(
    "website_metrics_job",
    selection=dg.AssetSelection.assets(website_metrics),
    op_retry_policy=NETWORK_RETRY_POLICY,
)


@dg.schedule(
    name="website_metrics_schedule",
    job=website_metrics_job,
    cron_schedule="0 1 * * *",
    execution_timezone="UTC",
    default_status=schedule_status(),
    description="At 01:00 UTC, export yesterday. Days whose fastpath data version changes "
    "later (late uploads) are re-exported by website_metrics_automation_sensor.",
)
def website_metrics_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    day = f"{context.scheduled_execution_time.date() - timedelta(days=1):%Y-%m-%d}"
    return dg.RunRequest(run_key=f"website_metrics {day}", partition_key=day)


website_metrics_automation_sensor = dg.AutomationConditionSensorDefinition(
    "website_metrics_automation_sensor",
    target=dg.AssetSelection.assets(website_metrics),
    default_status=launching_sensor_status(),
    minimum_interval_seconds=60,
    description="Re-exports each website_metrics day whose fastpath data version changed.",
)
