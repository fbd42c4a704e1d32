"""The consumer exports on time (yesterday's day, last month); later changes to a
day's fastpath data re-export through the assets' automation, as website_metrics."""

from datetime import timedelta

import dagster as dg

from ooni_pipeline.common import RETRIED, launching_sensor_status, schedule_status
from ooni_pipeline.exports.aggregates import DAILY_KEY, MONTHLY_KEY
from ooni_pipeline.exports.parquet import WEBSITE_METRICS_PARQUET_KEY
from ooni_pipeline.exports.schedules import previous_day_schedule
from ooni_pipeline.exports.watchlists import KEY_PREFIX

DAILY_SELECTION = dg.AssetSelection.assets(
    DAILY_KEY, WEBSITE_METRICS_PARQUET_KEY
) | dg.AssetSelection.key_prefixes([KEY_PREFIX])
MONTHLY_SELECTION = dg.AssetSelection.assets(MONTHLY_KEY)

consumer_exports_daily_job = dg.define_asset_job(
    "consumer_exports_daily_job", selection=DAILY_SELECTION, tags=RETRIED
)
consumer_exports_monthly_job = dg.define_asset_job(
    "consumer_exports_monthly_job",
    selection=MONTHLY_SELECTION,
    tags=RETRIED,
)


consumer_exports_daily_schedule = previous_day_schedule(
    "consumer_exports_daily_schedule",
    consumer_exports_daily_job,
    "15 1 * * *",
    "At 01:15 UTC, the daily aggregate, the Parquet table and every watchlist "
    "of yesterday. Later changes re-export through consumer_exports_automation_sensor.",
    run_key="consumer_exports",
)


@dg.schedule(
    name="website_metrics_monthly_schedule",
    job=consumer_exports_monthly_job,
    cron_schedule="0 3 1 * *",
    execution_timezone="UTC",
    default_status=schedule_status(),
    description="On the 1st at 03:00 UTC, last month's rollup (after its last day's exports).",
)
def website_metrics_monthly_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    month = f"{context.scheduled_execution_time.date().replace(day=1) - timedelta(days=1):%Y-%m}"
    return dg.RunRequest(run_key=f"website_metrics_monthly {month}", partition_key=month)


consumer_exports_automation_sensor = dg.AutomationConditionSensorDefinition(
    "consumer_exports_automation_sensor",
    target=DAILY_SELECTION | MONTHLY_SELECTION,
    default_status=launching_sensor_status(),
    minimum_interval_seconds=60,
    description="Re-exports each consumer export partition (a day, or a month of days) "
    "whose fastpath data version changed.",
)
