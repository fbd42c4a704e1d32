"""Exports for the public: the daily website-metrics CSV and the consumer exports
(watchlists, aggregates, Parquet, the manifest)."""

import dagster as dg

from ooni_pipeline.exports.aggregates import (
    website_metrics_monthly,
    website_metrics_monthly_check,
)
from ooni_pipeline.exports.consumer_schedules import (
    consumer_exports_automation_sensor,
    consumer_exports_daily_schedule,
    website_metrics_monthly_schedule,
)
from ooni_pipeline.exports.daily_consumers import build_daily_consumer_exports
from ooni_pipeline.exports.schedules import (
    website_metrics_automation_sensor,
    website_metrics_schedule,
)
from ooni_pipeline.exports.watchlists import watchlists_from_env
from ooni_pipeline.exports.website_metrics import website_metrics, website_metrics_object_check

consumer_exports_daily, consumer_exports_daily_checks = build_daily_consumer_exports(
    watchlists_from_env()
)

defs = dg.Definitions(
    assets=[website_metrics, consumer_exports_daily, website_metrics_monthly],
    asset_checks=[
        website_metrics_object_check,
        website_metrics_monthly_check,
        *consumer_exports_daily_checks,
    ],
    schedules=[
        website_metrics_schedule,
        consumer_exports_daily_schedule,
        website_metrics_monthly_schedule,
    ],
    sensors=[website_metrics_automation_sensor, consumer_exports_automation_sensor],
)
