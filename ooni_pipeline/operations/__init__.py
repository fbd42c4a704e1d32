"""Running unattended: failure alerts, retries in later runs, freshness policies."""

from ooni_pipeline.operations.alerts import run_failure_alert_sensor
from ooni_pipeline.operations.freshness import with_freshness
from ooni_pipeline.operations.retries import build_delayed_retry_sensor

__all__ = ["build_delayed_retry_sensor", "run_failure_alert_sensor", "with_freshness"]
