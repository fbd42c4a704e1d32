"""Fingerprint updater: DNS and HTTP blocking fingerprints, hourly."""

import dagster as dg

from ooni_pipeline.common import asset_schedule
from ooni_pipeline.fingerprints.assets import (
    fingerprints_dns,
    fingerprints_dns_check,
    fingerprints_http,
    fingerprints_http_check,
)

fingerprints_schedule = asset_schedule(
    "fingerprints",
    [fingerprints_dns, fingerprints_http],
    "5 * * * *",
    retry=False,  # the next tick, an hour on, is the retry
    description="Refresh the blocking fingerprints",
)

defs = dg.Definitions(
    assets=[fingerprints_dns, fingerprints_http],
    asset_checks=[fingerprints_dns_check, fingerprints_http_check],
    schedules=[fingerprints_schedule],
)
