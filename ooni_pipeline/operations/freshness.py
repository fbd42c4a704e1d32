"""Freshness checks: flag data older than its schedule allows.

Evaluated by ``freshness_checks_sensor``; a stale asset shows a failed (warning)
check in the UI, and the run-failure alert does not fire for it: it is a signal,
not a failed run.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import dagster as dg

# asset key prefix or key -> the age past which it is stale (CONTRACT schedules + slack)
MAX_AGE = {
    "citizenlab": timedelta(hours=2),
    "fingerprints_dns": timedelta(hours=3),
    "fingerprints_http": timedelta(hours=3),
    "asnmeta": timedelta(days=8),
    "geoip_db": timedelta(days=8),
    "backup": timedelta(days=8),
}
# Yesterday's partition must exist by 06:00 UTC.
DAILY_EXPORT_DEADLINE_CRON = "0 6 * * *"
# The daily partitioned assets held to that deadline (public_fastpath is opt-in, and
# fastpath is observed only when its data changes).
DAILY_DEADLINE_ASSETS = ("website_metrics",)
# Assets without a freshness check, and why: age says nothing about them.
WITHOUT_FRESHNESS = {
    "fastpath": "observed only when a day's data changes; an old observation is not stale data",
    "public_fastpath": "opt-in ingestion; its schedule is off unless OONI_PUBLIC_COUNTRIES is set",
    "ooni_measurement_bucket": "written by OONI outside Dagster; public_fastpath says when it reads it",
}


def build_freshness(
    assets: Sequence[dg.AssetsDefinition],
) -> tuple[list[dg.AssetChecksDefinition], dg.SensorDefinition]:
    """Freshness checks for the assets named in ``MAX_AGE`` (and the daily export), and their sensor."""
    checks: list[dg.AssetChecksDefinition] = []
    for asset in assets:
        for key in asset.keys:
            first = key.path[0]
            if key.to_user_string() in MAX_AGE:
                age = MAX_AGE[key.to_user_string()]
            elif first in MAX_AGE and len(key.path) > 1:
                age = MAX_AGE[first]
            else:
                continue
            checks.extend(
                dg.build_last_update_freshness_checks(assets=[key], lower_bound_delta=age)
            )
    partitioned = [
        a
        for a in assets
        if a.partitions_def is not None
        and any(key.to_user_string() in DAILY_DEADLINE_ASSETS for key in a.keys)
    ]
    if partitioned:
        checks.extend(
            dg.build_time_partition_freshness_checks(
                assets=partitioned, deadline_cron=DAILY_EXPORT_DEADLINE_CRON, timezone="UTC"
            )
        )
    sensor = dg.build_sensor_for_freshness_checks(
        freshness_checks=checks,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=600,
    )
    return checks, sensor
