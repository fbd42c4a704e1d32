"""Running unattended: failure alerts and freshness checks."""

from ooni_pipeline.operations.alerts import run_failure_alert_sensor
from ooni_pipeline.operations.freshness import build_freshness

__all__ = ["build_freshness", "run_failure_alert_sensor"]
