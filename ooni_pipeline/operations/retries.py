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
- a run of the same job or assets is queued or in progress: the retry waits for it,
  for ``GIVE_UP_AFTER_S`` at most; then the failure is alerted (its alert was held
  back for the retry) and the run tagged ``GIVE_UP_TAG``, so it is not lost unseen.

Only runs of jobs tagged ``MAX_RETRIES_TAG`` (``common.RETRIED``) are retried: the
scheduled jobs, not a materialization launched from an asset's page.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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
# How long a due retry waits for runs of the same assets to end before it is given up.
GIVE_UP_AFTER_S = 6 * 3600
GIVE_UP_TAG = "ooni/retry_given_up"
# Failed runs are looked at until their last retry could have been given up, and this.
LOOKBACK_MARGIN_S = 3600


def attempt(run: dg.DagsterRun) -> int:
    """Which try ``run`` is: 0 the first, n the n-th retry."""
    value = run.tags.get(ATTEMPT_TAG, "0")
    return int(value) if value.isdigit() else 0


SENSOR_NAME = "delayed_retry_sensor"


def will_be_retried(run: dg.DagsterRun) -> bool:
    """Whether a failure of ``run`` gets a retry (unless a later run makes it moot),
    by its tags; the sensor must be running too (``retry_sensor_running``)."""
    limit = run.tags.get(MAX_RETRIES_TAG, "0")
    return limit.isdigit() and attempt(run) < min(int(limit), len(RETRY_WAITS_MIN))


def retry_sensor_running(instance: dg.DagsterInstance) -> bool:
    """Whether ``delayed_retry_sensor`` runs: as switched in the UI, else its default
    (stopped with ``OONI_SCHEDULES_DEFAULT=stopped``)."""
    from dagster._core.scheduler.instigation import InstigatorStatus, InstigatorType

    states = [
        s
        for s in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
        if s.name == SENSOR_NAME and s.status != InstigatorStatus.DECLARED_IN_CODE
    ]
    if states:
        return any(s.status == InstigatorStatus.RUNNING for s in states)
    return launching_sensor_status() == dg.DefaultSensorStatus.RUNNING


@dataclass
class RetryPlan:
    """What the retry sensor does at one tick."""

    requests: list[dg.RunRequest] = field(default_factory=list)
    # failed runs whose retry could not start in time: alerted now
    given_up: list[dg.DagsterRun] = field(default_factory=list)


def retry_requests(
    instance: dg.DagsterInstance, now: float, job_names: set[str] | None = None
) -> RetryPlan:
    """The retries due at ``now`` (a Unix time) of failed runs of ``job_names`` (all
    jobs: ``None``), oldest failure first, and the failures given up."""
    plan = RetryPlan()
    since = now - 60 * max(RETRY_WAITS_MIN) - GIVE_UP_AFTER_S - LOOKBACK_MARGIN_S
    failed = instance.get_run_records(
        dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.FAILURE],
            updated_after=datetime.fromtimestamp(since, timezone.utc),
        ),
        ascending=True,
    )
    for record in failed:
        run, ended = record.dagster_run, record.end_time
        if ended is None or not will_be_retried(run) or GIVE_UP_TAG in run.tags:
            continue
        if job_names is not None and run.job_name not in job_names:
            continue  # a job of another code location, or one that is gone
        due = ended + 60 * RETRY_WAITS_MIN[attempt(run)]
        if now < due:
            continue
        partitions = {k: run.tags[k] for k in PARTITION_TAGS if k in run.tags}
        later = instance.get_runs(
            dg.RunsFilter(
                job_name=run.job_name, created_after=datetime.fromtimestamp(ended, timezone.utc)
            )
        )
        if any({k: r.tags[k] for k in PARTITION_TAGS if k in r.tags} == partitions for r in later):
            continue
        if runs_in_flight(instance, run.job_name, set(run.asset_selection or ()), now):
            if now >= due + GIVE_UP_AFTER_S:
                instance.add_run_tags(run.run_id, {GIVE_UP_TAG: "true"})
                plan.given_up.append(run)
            continue
        plan.requests.append(
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
    return plan


def build_delayed_retry_sensor(jobs: list) -> dg.SensorDefinition:
    """The sensor retrying failed runs of ``jobs`` (those tagged ``MAX_RETRIES_TAG``)."""

    @dg.sensor(
        name=SENSOR_NAME,
        jobs=jobs,
        minimum_interval_seconds=60,
        default_status=launching_sensor_status(),
        description="Retries a failed scheduled run in a new run "
        f"{', '.join(map(str, RETRY_WAITS_MIN))} minutes after each failure, unless a "
        "later run of the same job and partitions exists; no run slot is held while waiting.",
    )
    def delayed_retry_sensor(context: dg.SensorEvaluationContext):
        from ooni_pipeline.operations.alerts import alert_given_up_retry

        plan = retry_requests(context.instance, time.time(), {job.name for job in jobs})
        for run in plan.given_up:
            alert_given_up_retry(context, run)
        return plan.requests or dg.SkipReason("no failed scheduled run is due for a retry")

    return delayed_retry_sensor
