"""Automation under OONI's real write pattern: what the daemon would launch, counted.

Dagster's own evaluation runs here (``evaluate_automation_conditions``, the schedules'
and the retry sensor's evaluation against a real instance, run records with their
times); what a launched run would do is reported as its outcome (a materialization,
a failure), at simulated times (``freeze_time``), so a day or an outage is simulated
in seconds.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone

import dagster as dg
from dagster._core.definitions.data_version import DATA_VERSION_TAG
from dagster._core.events import (
    AssetMaterializationPlannedData,
    DagsterEvent,
    DagsterEventType,
    StepMaterializationData,
)
from dagster._core.test_utils import create_run_for_test, freeze_time
from dagster._vendored.croniter import croniter

from ooni_pipeline.common import ATTEMPT_TAG, RETRY_WAITS_MIN
from ooni_pipeline.exports import aggregates
from ooni_pipeline.exports.daily_consumers import build_daily_consumer_exports
from ooni_pipeline.exports.website_metrics import DEFAULT_REEXPORT_CRON, website_metrics
from ooni_pipeline.fastpath.assets import build_fastpath_asset
from ooni_pipeline.operations.alerts import reason_not_to_alert
from ooni_pipeline.operations.retries import retry_requests

UTC = timezone.utc


def _export_defs() -> dg.Definitions:
    from ooni_pipeline.clickhouse import ClickHouseResource
    from ooni_pipeline.object_store import ObjectStoreResource

    daily, _ = build_daily_consumer_exports({"bbc": ("bbc.com",)})
    return dg.Definitions(
        assets=[
            build_fastpath_asset("external"),
            website_metrics,
            daily,
            aggregates.website_metrics_monthly,
        ],
        resources={"clickhouse": ClickHouseResource(), "object_store": ObjectStoreResource()},
    )


def materialized_by_a_run(instance: dg.DagsterInstance, keys: list[str], partition: str) -> None:
    """The outcome of a run launched for ``keys``' ``partition``: a run that
    materialized them (as the daemon's run would, not a runless report, which
    automation conditions read as the target's own run)."""
    asset_keys = [dg.AssetKey.from_user_string(k) for k in keys]
    run = create_run_for_test(
        instance,
        job_name="__ASSET_JOB",
        asset_selection=frozenset(asset_keys),
        status=dg.DagsterRunStatus.STARTED,
        tags={"dagster/partition": partition},
    )
    for key in asset_keys:  # what the run's plan writes, as a launched run records it
        planned = AssetMaterializationPlannedData(key, partition=partition)
        instance.report_dagster_event(
            DagsterEvent.build_asset_materialization_planned_event("__ASSET_JOB", "s", planned),
            run.run_id,
        )
    for key in asset_keys:
        data = StepMaterializationData(dg.AssetMaterialization(key, partition=partition))
        event = DagsterEvent(
            DagsterEventType.ASSET_MATERIALIZATION.value,
            job_name="__ASSET_JOB",
            event_specific_data=data,
        )
        instance.report_dagster_event(event, run.run_id)
    done = DagsterEvent(DagsterEventType.RUN_SUCCESS.value, job_name="__ASSET_JOB")
    instance.report_dagster_event(done, run.run_id)


def test_continuous_writes_re_export_each_changed_day_once_a_day_after_the_tick() -> None:
    """Two days of OONI's service writing continuously: every hour the observation
    moves the data version of each of the last 7 days. Each day's exports are
    re-exported at most once a day, at the settle tick, and only if its data moved
    since; the month only after its days' exports, once a day too."""
    defs = _export_defs()
    instance = dg.DagsterInstance.ephemeral()
    start = datetime(2024, 4, 3, tzinfo=UTC)  # the last 7 days: 5 of March, 2 of April
    cursor = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, evaluation_time=start
    ).cursor
    launched: list[tuple[datetime, str, str]] = []
    for hour in range(48):
        now = start + timedelta(hours=hour)
        if now < start + timedelta(hours=30):  # writes stop at 06:00 on the second day
            for back in range(1, 8):
                day = f"{(now - timedelta(days=back)).date()}"
                version = f"{1000 + hour}@{hour:04d}"
                instance.report_runless_asset_event(
                    dg.AssetObservation("fastpath", partition=day, tags={DATA_VERSION_TAG: version})
                )
        for minute in (0, 30):
            at = now + timedelta(minutes=minute)
            result = dg.evaluate_automation_conditions(
                defs=defs, instance=instance, evaluation_time=at, cursor=cursor
            )
            cursor = result.cursor
            for request in result.results:
                for partition in request.true_subset.expensively_compute_partition_keys():
                    launched.append((at, request.key.to_user_string(), partition))
            # each requested asset partition is exported at once, by its own run
            for _, key, partition in [x for x in launched if x[0] == at]:
                materialized_by_a_run(instance, [key], partition)

    tick = croniter(DEFAULT_REEXPORT_CRON, start)
    ticks = {tick.get_next(datetime), tick.get_next(datetime)}
    assert {at for at, _, _ in launched} <= {t.replace(tzinfo=UTC) for t in ticks} | {
        t.replace(tzinfo=UTC) + timedelta(minutes=30) for t in ticks
    }
    per_day = Counter((at.date(), key, partition) for at, key, partition in launched)
    assert per_day and max(per_day.values()) == 1, per_day.most_common(3)
    by_key = Counter(key for _, key, _ in launched)
    # The first tick: the 7 days observed moving; the second: the days that moved
    # since (the 7 of the first tick's last hours, and the new yesterday): 15 of 336
    # hourly moves, each an export before.
    assert by_key["website_metrics"] == 7 + 8
    assert by_key["website_metrics_daily"] == by_key["watchlists/bbc"] == 7 + 8
    # March (a partition: it has ended; April is not yet), once on each day, after its
    # days' exports.
    assert by_key["website_metrics_monthly"] == 2
    assert all(p == "2024-03" for _, k, p in launched if k == "website_metrics_monthly")
    # Without the settle tick, the same writes would re-export every day every hour.


def _run(instance, repo, job_name: str, at: datetime, tags: dict[str, str]) -> dg.DagsterRun:
    job = repo.get_job(job_name)
    with freeze_time(at):
        return create_run_for_test(
            instance,
            job_name=job_name,
            tags={**job.tags, **tags},
            status=dg.DagsterRunStatus.STARTED,
            asset_selection=frozenset(job.asset_layer.executable_asset_keys),
        )


def _finish(instance, run: dg.DagsterRun, at: datetime, ok: bool) -> None:
    with freeze_time(at):
        if ok:
            event = DagsterEvent(DagsterEventType.RUN_SUCCESS.value, job_name=run.job_name)
            instance.report_dagster_event(event, run.run_id)
        else:
            instance.report_run_failed(run)


def test_an_upstream_down_for_three_hours_gets_one_run_at_a_time_and_retries_off_the_slots() -> (
    None
):
    """Citizenlab (every 30 minutes), the fingerprints (hourly) and asnmeta (Mondays
    03:00, retried) from 00:00 to 06:00 with their upstream down from 02:00 for
    3 hours; a run takes 3 minutes, the first citizenlab run of the
    day 40 (queued behind a backfill). Counted: the runs of each job, how many are
    in flight at once, the alerts."""
    from ooni_pipeline.definitions import defs

    repo = defs.get_repository_def()
    with dg.instance_for_test() as instance:
        _outage(repo, instance)


def _outage(repo, instance) -> None:
    start = datetime(2026, 11, 30, tzinfo=UTC)  # a Monday
    down = (start + timedelta(hours=2), start + timedelta(hours=5))
    schedules = {
        name: repo.get_schedule_def(name)
        for name in ("citizenlab_schedule", "fingerprints_schedule", "asnmeta_schedule")
    }
    running: dict[str, tuple[dg.DagsterRun, datetime]] = {}
    runs: dict[str, list[dg.DagsterRun]] = defaultdict(list)
    most_in_flight: Counter[str] = Counter()

    def launch(job_name: str, at: datetime, tags: dict[str, str]) -> None:
        run = _run(instance, repo, job_name, at, tags)
        first = job_name == "citizenlab_job" and not runs[job_name]
        running[run.run_id] = (run, at + timedelta(minutes=40 if first else 3))
        runs[job_name].append(run)

    for minute in range(6 * 60):
        now = start + timedelta(minutes=minute)
        for run_id, (run, ends) in list(running.items()):
            if ends <= now:
                _finish(instance, run, now, ok=not down[0] <= now < down[1])
                del running[run_id]
        for schedule in schedules.values():
            if croniter.match(schedule.cron_schedule, now.replace(tzinfo=None)):
                context = dg.build_schedule_context(
                    instance=instance, scheduled_execution_time=now, repository_def=repo
                )
                data = schedule.evaluate_tick(context)
                for request in data.run_requests or []:
                    launch(schedule.job_name, now, dict(request.tags))
        for request in retry_requests(instance, now.timestamp()).requests:
            launch(request.job_name, now, dict(request.tags))
        for name, count in Counter(run.job_name for run, _ in running.values()).items():
            most_in_flight[name] = max(most_in_flight[name], count)
    failed = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
    alerts = Counter(r.job_name for r in failed if reason_not_to_alert(instance, r) is None)
    counts = {name: len(r) for name, r in runs.items()}
    # One run per tick (12 half hours, 6 hours), the first tick's slow run skipping the next.
    assert counts["citizenlab_job"] == 11
    assert counts["fingerprints_job"] == 6
    # asnmeta: 03:00 fails, retried 10, 30 and 70 minutes after each failure: the third
    # retry, at about 05:00, finds the upstream back.
    assert counts["asnmeta_job"] == 4
    assert [run.tags.get(ATTEMPT_TAG, "0") for run in runs["asnmeta_job"]] == ["0", "1", "2", "3"]
    starts = [
        r.create_timestamp
        for r in instance.get_run_records(dg.RunsFilter(job_name="asnmeta_job"), ascending=True)
    ]
    waits = [round((b - a).total_seconds() / 60) for a, b in zip(starts, starts[1:], strict=False)]
    assert waits == [w + 3 for w in RETRY_WAITS_MIN]
    # Never two runs of a job at once, and no run waiting for a retry inside itself.
    assert max(most_in_flight.values()) == 1
    assert all(repo.get_job(s.job_name).op_retry_policy is None for s in repo.schedule_defs)
    # One alert per job that failed for good; none for asnmeta, whose retry succeeded.
    assert dict(alerts) == {"citizenlab_job": 1, "fingerprints_job": 1}


def test_a_run_stuck_in_flight_blocks_its_schedule_and_retries_for_hours_not_forever(
    monkeypatch,
) -> None:
    """A worker gone with its code server leaves its run STARTED (a run may also never
    leave NOT_STARTED): the guard lets the next tick through once the run is older than
    STALE_IN_FLIGHT_S, so the lock of that run can recover the stuck one. A failure
    whose retry a long run of the same assets holds back is alerted after
    GIVE_UP_AFTER_S, not dropped unseen; a failure of a job the sensor does not launch
    is left alone; with the retry sensor stopped, failures are alerted at once."""
    from ooni_pipeline.common import STALE_IN_FLIGHT_S
    from ooni_pipeline.definitions import defs
    from ooni_pipeline.operations.retries import GIVE_UP_AFTER_S, GIVE_UP_TAG

    repo = defs.get_repository_def()
    start = datetime(2026, 11, 30, tzinfo=UTC)
    with dg.instance_for_test() as instance:
        _run(instance, repo, "citizenlab_job", start, {})  # stuck STARTED
        schedule = repo.get_schedule_def("citizenlab_schedule")

        def tick(at: datetime):
            context = dg.build_schedule_context(
                instance=instance, scheduled_execution_time=at, repository_def=repo
            )
            return schedule.evaluate_tick(context)

        assert not tick(start + timedelta(minutes=30)).run_requests
        later = start + timedelta(seconds=STALE_IN_FLIGHT_S + 60)
        assert len(tick(later).run_requests) == 1

        # A backfill of website_metrics running for 8 hours beside a failed scheduled day.
        backfill = _run(
            instance, repo, "website_metrics_job", start, {"dagster/partition": "2026-11-20"}
        )
        failed = _run(instance, repo, "website_metrics_job", start + timedelta(minutes=5), {"dagster/partition": "2026-11-29"})  # fmt: skip
        _finish(instance, failed, start + timedelta(minutes=6), ok=False)
        names = {j.name for j in repo.get_sensor_def("delayed_retry_sensor").jobs}
        for minutes in range(10, 60 * 7, 10):
            plan = retry_requests(instance, (start + timedelta(minutes=minutes)).timestamp(), names)
            assert not plan.requests
            if plan.given_up:
                break
        assert [r.run_id for r in plan.given_up] == [failed.run_id]
        assert minutes * 60 >= 16 * 60 + GIVE_UP_AFTER_S - 600
        assert instance.get_run_by_id(failed.run_id).tags[GIVE_UP_TAG] == "true"
        assert not retry_requests(
            instance, (start + timedelta(hours=7)).timestamp(), names
        ).given_up
        _finish(instance, backfill, start + timedelta(hours=8), ok=True)

        # A job this code location does not define (renamed, another location's).
        gone = create_run_for_test(instance, job_name="gone_job", tags={"ooni/max_retries": "3"})
        with freeze_time(start + timedelta(hours=9)):
            instance.report_run_failed(gone)
        at = (start + timedelta(hours=10)).timestamp()
        assert all(r.job_name != "gone_job" for r in retry_requests(instance, at, names).requests)

        # The retry sensor stopped (a staging copy): the failure is alerted at once.
        assert reason_not_to_alert(instance, instance.get_run_by_id(gone.run_id))
        monkeypatch.setenv("OONI_SCHEDULES_DEFAULT", "stopped")
        assert reason_not_to_alert(instance, instance.get_run_by_id(gone.run_id)) is None
