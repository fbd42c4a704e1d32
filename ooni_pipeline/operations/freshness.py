"""Freshness policies: flag data older than its schedule allows.

Dagster's freshness daemon (part of ``dagster-daemon``, on by default; see
``freshness:`` in dagster.yaml) evaluates each asset's ``FreshnessPolicy`` from its
latest materialization, with no sensor or check runs. A stale asset shows
*Freshness: Failed* in the UI; the run-failure alert does not fire for it: it is a
signal, not a failed run.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import dagster as dg

# asset key or key prefix -> the age past which it is stale (CONTRACT schedules + slack)
MAX_AGE = {
    "citizenlab": timedelta(hours=2),
    "fingerprints_dns": timedelta(hours=3),
    "fingerprints_http": timedelta(hours=3),
    "asnmeta": timedelta(days=8),
    "geoip_db": timedelta(days=8),
    "backup": timedelta(days=8),
    # detected every hour at HH:20
    "blocking_status": timedelta(hours=3),
    "blocking_events": timedelta(hours=3),
}
# Yesterday's export must have been written by 06:00 UTC. Dagster's policy judges
# the asset's latest materialization, not a partition's: the daily partitions are
# held to it by asking for a materialization between the schedule's 01:00 UTC tick,
# which exports yesterday, and 06:00.
DAILY_EXPORT_DEADLINE_CRON = "0 6 * * *"
DAILY_EXPORT_WINDOW = timedelta(hours=5)
_DAILY_EXPORT = dg.FreshnessPolicy.cron(
    deadline_cron=DAILY_EXPORT_DEADLINE_CRON,
    lower_bound_delta=DAILY_EXPORT_WINDOW,
    timezone="UTC",
)
# asset key or key prefix -> its deadline: the consumer exports of yesterday (01:15
# UTC schedule) by 06:00 as well; last month's rollup (03:00 UTC on the 1st) by 06:00.
DAILY_DEADLINE = {
    "website_metrics": _DAILY_EXPORT,
    "website_metrics_daily": _DAILY_EXPORT,
    "website_metrics_parquet": _DAILY_EXPORT,
    "watchlists": _DAILY_EXPORT,
    "website_metrics_monthly": dg.FreshnessPolicy.cron(
        deadline_cron="0 6 1 * *", lower_bound_delta=timedelta(hours=3), timezone="UTC"
    ),
}
# Assets without a freshness policy, and why: age says nothing about them.
WITHOUT_FRESHNESS = {
    "fastpath": "observed only when a day's data changes; an old observation is not stale data",
    "public_fastpath": "opt-in ingestion; its schedule is off unless OONI_PUBLIC_COUNTRIES is set",
    "ooni_measurement_bucket": "written by OONI outside Dagster; public_fastpath says when it reads it",
}


def freshness_policy(key: dg.AssetKey) -> dg.FreshnessPolicy | None:
    """The policy of ``key``: its daily deadline, or its maximum age by key or key prefix."""
    name = key.to_user_string()
    if name in DAILY_DEADLINE:
        return DAILY_DEADLINE[name]
    if len(key.path) > 1 and key.path[0] in DAILY_DEADLINE:
        return DAILY_DEADLINE[key.path[0]]
    age = MAX_AGE.get(name)
    if age is None and len(key.path) > 1:
        age = MAX_AGE.get(key.path[0])
    return dg.FreshnessPolicy.time_window(fail_window=age) if age is not None else None


def with_freshness(
    assets: Sequence[dg.AssetsDefinition | dg.AssetSpec],
) -> Sequence[dg.AssetsDefinition | dg.AssetSpec]:
    """The assets, each carrying its freshness policy (those without one unchanged)."""

    def attach(spec: dg.AssetSpec) -> dg.AssetSpec:
        policy = freshness_policy(spec.key)
        return spec.replace_attributes(freshness_policy=policy) if policy else spec

    return dg.map_asset_specs(attach, assets)
