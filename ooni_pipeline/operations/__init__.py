"""Running unattended: failure alerts and freshness policies."""

from ooni_pipeline.operations.alerts import run_failure_alert_sensor
from ooni_pipeline.operations.freshness import with_freshness

__all__ = ["run_failure_alert_sensor", "with_freshness"]
