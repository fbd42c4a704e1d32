"""Failed scheduled runs retried by later runs, not by steps waiting in their run.

A step retry policy keeps the failed run in progress while it waits (10, 30, then 70
minutes): one of the instance's ``max_concurrent_runs`` is held for up to 110 minutes
by a run doing nothing, and during an upstream outage several of them fill the
instance while exports and the detector queue. Here the failed run ends; this sensor
launches its retry when the wait is over, as a new run of the same job, assets and
partitions, tagged with its try number (``ATTEMPT_TAG``) and the run it retries.

A retry is not launched when it has nothing left to do, or would run beside another:

- a run of the same job and partitions was created after the failure (a schedule's
  next tick, someone's re-execution, this retry already launched): that run is the
  retry, and its own failure is retried in turn;
- a run of the same job or assets is queued or in progress: the retry waits for it.

Only runs of jobs tagged ``MAX_RETRIES_TAG`` (``common.RETRIED``) are retried: the
scheduled jobs, not a materialization launched from an asset's page.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import dagster as dg

from ooni_pipeline.common import (
    ATTEMPT_TAG,
    MAX_RETRIES_TAG,
    RETRY_OF_TAG,
    RETRY_WAITS_MIN,
    launching_sensor_status,
    runs_in_flight,
)

# The tags that name a run's partitions: a retry carries them unchanged.
PARTITION_TAGS = (
    "dagster/partition",
    "dagster/asset_partition_range_start",
    "dagster/asset_partition_range_end",
)
# Failed runs older than the longest wait plus this margin are not looked at again.
LOOKBACK_MARGIN_S = 3600


def attempt(run: dg.DagsterRun) -> int:
    """Which try ``run`` is: 0 the first, n the n-th retry."""
    value = run.tags.get(ATTEMPT_TAG, "0")
    return int(value) if value.isdigit() else 0


def will_be_retried(run: dg.DagsterRun) -> bool:
    """Whether a failure of ``run`` gets a retry (unless a later run makes it moot)."""
    limit = run.tags.get(MAX_RETRIES_TAG, "0")
    return limit.isdigit() and attempt(run) < min(int(limit), len(RETRY_WAITS_MIN))


def retry_requests(instance: dg.DagsterInstance, now: float) -> list[dg.RunRequest]:
    """The retries due at ``now`` (a Unix time), oldest failure first."""
    since = now - 60 * max(RETRY_WAITS_MIN) - LOOKBACK_MARGIN_S
    failed = instance.get_run_records(
        dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.FAILURE],
            updated_after=datetime.fromtimestamp(since, timezone.utc),
        ),
        ascending=True,
    )
    requests = []
    for record in failed:
        run, ended = record.dagster_run, record.end_time
        if ended is None or not will_be_retried(run):
            continue
        if now < ended + 60 * RETRY_WAITS_MIN[attempt(run)]:
            continue
        partitions = {k: run.tags[k] for k in PARTITION_TAGS if k in run.tags}
        later = instance.get_runs(
            dg.RunsFilter(
                job_name=run.job_name, created_after=datetime.fromtimestamp(ended, timezone.utc)
            )
        )
        if any({k: r.tags[k] for k in PARTITION_TAGS if k in r.tags} == partitions for r in later):
            continue
        if runs_in_flight(instance, run.job_name, set(run.asset_selection or ())):
            continue
        requests.append(
            dg.RunRequest(
                run_key=f"retry of {run.run_id}",
                job_name=run.job_name,
                asset_selection=list(run.asset_selection) if run.asset_selection else None,
                partition_key=partitions.get("dagster/partition"),
                tags={
                    **{k: v for k, v in partitions.items() if k != "dagster/partition"},
                    MAX_RETRIES_TAG: run.tags[MAX_RETRIES_TAG],
                    ATTEMPT_TAG: str(attempt(run) + 1),
                    RETRY_OF_TAG: run.run_id,
                },
            )
        )
    return requests


def build_delayed_retry_sensor(jobs: list) -> dg.SensorDefinition:
    """The sensor retrying failed runs of ``jobs`` (those tagged ``MAX_RETRIES_TAG``)."""

    @dg.sensor(
        name="delayed_retry_sensor",
        jobs=jobs,
        minimum_interval_seconds=60,
        default_status=launching_sensor_status(),
        description="Retries a failed scheduled run in a new run "
        f"{', '.join(map(str, RETRY_WAITS_MIN))} minutes after each failure, unless a "
        "later run of the same job and partitions exists; no run slot is held while waiting.",
    )
    def delayed_retry_sensor(context: dg.SensorEvaluationContext):
        requests = retry_requests(context.instance, time.time())
        return requests or dg.SkipReason("no failed scheduled run is due for a retry")

    return delayed_retry_sensor
