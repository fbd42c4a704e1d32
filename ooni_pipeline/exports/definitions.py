"""Exports for the public: the daily website-metrics CSV."""

import dagster as dg

from ooni_pipeline.exports.schedules import (
    website_metrics_automation_sensor,
    website_metrics_schedule,
)
from ooni_pipeline.exports.website_metrics import website_metrics, website_metrics_object_check

defs = dg.Definitions(
    assets=[website_metrics],
    asset_checks=[website_metrics_object_check],
    schedules=[website_metrics_schedule],
    sensors=[website_metrics_automation_sensor],
)
