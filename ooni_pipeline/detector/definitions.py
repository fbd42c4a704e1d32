"""The blocking detector: hourly on time, again for any day whose fastpath changed."""

import dagster as dg

from ooni_pipeline.common import RETRIED, launching_sensor_status, schedule_status
from ooni_pipeline.detector.assets import blocking_detector

blocking_detector_job = dg.define_asset_job(
    "blocking_detector_job",
    selection=dg.AssetSelection.assets(blocking_detector),
    # A rerun is safe (rows are replaced, messages sent once): a ClickHouse or webhook
    # blip is retried like the updaters'.
    tags=RETRIED,
)

# At HH:20 the hour before is detected; late rows re-detect through the sensor below.
blocking_detector_schedule = dg.build_schedule_from_partitioned_job(
    blocking_detector_job,
    name="blocking_detector_schedule",
    minute_of_hour=20,
    default_status=schedule_status(),
    description="At 20 minutes past each hour, detect the hour before.",
)

blocking_detector_automation_sensor = dg.AutomationConditionSensorDefinition(
    "blocking_detector_automation_sensor",
    target=dg.AssetSelection.assets(blocking_detector),
    default_status=launching_sensor_status(),
    minimum_interval_seconds=60,
    description="Re-detects the hours of each day whose fastpath data version changed, "
    "and every hour detected after them.",
)

defs = dg.Definitions(
    assets=[blocking_detector],
    jobs=[blocking_detector_job],
    schedules=[blocking_detector_schedule],
    sensors=[blocking_detector_automation_sensor],
)
