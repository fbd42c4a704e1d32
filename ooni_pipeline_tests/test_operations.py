"""Failure alerts and freshness policies."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest

from ooni_pipeline.common import MAX_RETRIES_TAG, RETRY_WAITS_MIN
from ooni_pipeline.definitions import defs
from ooni_pipeline.operations.alerts import run_failure_alert_sensor
from ooni_pipeline.operations.freshness import (
    DAILY_EXPORT_DEADLINE_CRON,
    DAILY_EXPORT_WINDOW,
    WITHOUT_FRESHNESS,
    freshness_policy,
)
from ooni_pipeline_tests.rig import UpstreamServer


@dg.asset
def broken_asset() -> None:
    raise ValueError("injected failure: row 3, field scope")


def _failed_run_context(instance: dg.DagsterInstance, tags: dict | None = None):
    result = dg.materialize([broken_asset], instance=instance, raise_on_error=False, tags=tags)
    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE)
    return dg.build_run_status_sensor_context(
        sensor_name="run_failure_alert_sensor",
        dagster_instance=instance,
        dagster_run=run,
        dagster_event=failure,
    ).for_run_failure()


def test_alert_is_posted_to_the_webhook(
    upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OONI_ALERT_WEBHOOK_URL", upstream.url("hooks/secret-token"))
    monkeypatch.setenv("OONI_DAGSTER_URL", "http://dagster.example.org")
    instance = dg.DagsterInstance.ephemeral()
    context = _failed_run_context(instance)
    run_failure_alert_sensor(context)
    ((path, body),) = upstream.posts
    assert path == "/hooks/secret-token"
    text = json.loads(body)["text"]
    assert "broken_asset" in text
    assert "injected failure: row 3, field scope" in text
    assert f"http://dagster.example.org/runs/{context.dagster_run.run_id}" in text


@dg.asset
def hostile_asset() -> None:
    raise ValueError(
        "bad URL <!channel> <http://evil.example|click> ![x](http://evil.example/i.png) "
        "*bold* ``` & more\nsecond line"
    )


def test_untrusted_error_text_is_a_literal_in_the_alert(
    upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Error text can quote upstream or probe content: in the chat it must not ping
    the channel, link, embed an image or format anything."""
    monkeypatch.setenv("OONI_ALERT_WEBHOOK_URL", upstream.url("hooks/x"))
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([hostile_asset], instance=instance, raise_on_error=False)
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE)
    context = dg.build_run_status_sensor_context(
        sensor_name="run_failure_alert_sensor",
        dagster_instance=instance,
        dagster_run=instance.get_run_by_id(result.run_id),
        dagster_event=failure,
    ).for_run_failure()
    run_failure_alert_sensor(context)
    ((_, body),) = upstream.posts
    text = json.loads(body)["text"]
    error = text.split("error:\n", 1)[1].rsplit("\n", 1)[0]
    fence = "`" * 3
    assert error == (
        f"{fence}\nValueError: bad URL &lt;!channel&gt; &lt;http://evil.example|click&gt; "
        f"![x](http://evil.example/i.png) *bold* ''' &amp; more\n{fence}"
    )
    assert "<" not in text and "second line" not in text


def test_webhook_failure_does_not_leak_the_url(
    upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OONI_ALERT_WEBHOOK_URL", upstream.url("hooks/secret-token"))
    upstream.post_status = 500
    context = _failed_run_context(dg.DagsterInstance.ephemeral())
    with pytest.raises(RuntimeError) as info:
        run_failure_alert_sensor(context)
    assert "HTTP 500" in str(info.value) and "secret-token" not in str(info.value)


def test_runs_to_be_retried_are_not_reported(
    upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OONI_ALERT_WEBHOOK_URL", upstream.url("hooks/x"))
    instance = dg.DagsterInstance.ephemeral()
    context = _failed_run_context(instance, tags={"dagster/will_retry": "true"})
    run_failure_alert_sensor(context)
    assert upstream.posts == []


# The project's retries without the minutes between them.
STEP_RETRIES = dg.RetryPolicy(max_retries=len(RETRY_WAITS_MIN))


@dg.asset(retry_policy=STEP_RETRIES)
def flaky_asset(context) -> None:
    """Fails every try but the last, as a fetch does while a server is down for a while."""
    if context.retry_number < STEP_RETRIES.max_retries:
        raise ConnectionError(f"injected: connection reset on try {context.retry_number + 1}")


@dg.asset(retry_policy=STEP_RETRIES)
def down_asset() -> None:
    raise ConnectionError("injected: connection reset on every try")


@dg.asset(retry_policy=STEP_RETRIES)
def also_down_asset() -> None:
    raise ConnectionError("injected: connection reset on every try")


class _AlertSensorTicks:
    """The alert sensor evaluated as the daemon evaluates it: tick after tick over the
    instance's event log, the cursor carried from one tick to the next."""

    def __init__(self, instance: dg.DagsterInstance):
        self.instance, self.cursor = instance, None
        self.tick()  # the first tick only sets the cursor past the existing runs

    def tick(self) -> None:
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursor) as context:
            self.cursor = run_failure_alert_sensor.evaluate_tick(context).cursor


def test_a_step_retried_to_success_posts_no_alert_and_a_failed_run_posts_one(
    upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OONI_ALERT_WEBHOOK_URL", upstream.url("hooks/x"))
    instance = dg.DagsterInstance.ephemeral()
    ticks = _AlertSensorTicks(instance)

    recovered = dg.materialize([flaky_asset], instance=instance, raise_on_error=False)
    assert recovered.success
    retries = [e for e in recovered.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == STEP_RETRIES.max_retries
    ticks.tick()
    assert upstream.posts == []

    # Two steps failing their every try: one run failed, one alert.
    failed = dg.materialize([down_asset, also_down_asset], instance=instance, raise_on_error=False)
    assert not failed.success and len(failed.get_step_failure_events()) == 2
    ticks.tick()
    ticks.tick()  # a later tick does not report the same run again
    ((path, body),) = upstream.posts
    text = json.loads(body)["text"]
    assert path == "/hooks/x" and f"/runs/{failed.run_id}" in text
    assert "also_down_asset, down_asset" in text and "connection reset on every try" in text


def test_every_asset_is_described_owned_and_has_its_freshness_policy() -> None:
    repo = defs.get_repository_def()
    graph = repo.asset_graph
    exempt = {dg.AssetKey(name) for name in WITHOUT_FRESHNESS}
    policies = {key: graph.get(key).freshness_policy for key in graph.get_all_asset_keys()}
    assert {key for key, policy in policies.items() if policy is None} == exempt

    def window(age: timedelta) -> dg.FreshnessPolicy:
        return dg.FreshnessPolicy.time_window(fail_window=age)

    daily = dg.FreshnessPolicy.cron(
        deadline_cron="0 6 * * *", lower_bound_delta=timedelta(hours=5), timezone="UTC"
    )

    assert {key.to_user_string(): policy for key, policy in policies.items() if policy} == {
        "citizenlab": window(timedelta(hours=2)),
        "fingerprints_dns": window(timedelta(hours=3)),
        "fingerprints_http": window(timedelta(hours=3)),
        "asnmeta": window(timedelta(days=8)),
        "geoip_db": window(timedelta(days=8)),
        "blocking_status": window(timedelta(hours=3)),
        "blocking_events": window(timedelta(hours=3)),
        **{f"backup/{table}": window(timedelta(days=8)) for table in _backup_tables(graph)},
        # yesterday's export, made by the 01:00 UTC schedule, there by 06:00 UTC
        "website_metrics": daily,
        # the consumer exports: yesterday's by 06:00 UTC too, last month's on the 1st
        "website_metrics_daily": daily,
        "website_metrics_parquet": daily,
        "website_metrics_monthly": dg.FreshnessPolicy.cron(
            deadline_cron="0 6 1 * *", lower_bound_delta=timedelta(hours=3), timezone="UTC"
        ),
    }
    assert freshness_policy(dg.AssetKey(["watchlists", "bbc"])) == daily
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description and len(node.description) > 40, key
        assert node.owners, key
        assert node.kinds, key
        assert "dagster/code_references" in node.metadata, key
    # Every step that opens ClickHouse, checks included, takes a slot of the pool.
    for checks_def in repo.asset_checks_defs_by_key.values():
        check_keys = list(checks_def.check_keys)
        # These read files or objects only.
        if any(k.name in ("geoip_db_lookup_check", "objects_check") for k in check_keys):
            continue
        assert checks_def.node_def.pools == {"clickhouse"}, check_keys
    sensors = {s.name for s in repo.sensor_defs}
    assert "run_failure_alert_sensor" in sensors
    for schedule in repo.schedule_defs:
        assert schedule.execution_timezone == "UTC"
        # Ingesting OONI's bucket is opt-in (OONI_PUBLIC_COUNTRIES unset here).
        expected = (
            dg.DefaultScheduleStatus.STOPPED
            if schedule.name == "public_fastpath_schedule"
            else dg.DefaultScheduleStatus.RUNNING
        )
        assert schedule.default_status == expected, schedule.name


def _backup_tables(graph) -> list[str]:
    return [k.path[1] for k in graph.get_all_asset_keys() if k.path[0] == "backup"]


_LOAD_WARNINGS = """
import json, warnings
import dagster as dg
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ooni_pipeline.definitions
print(json.dumps([
    f"{w.category.__name__}: {w.message}" for w in caught
    if not issubclass(w.category, dg.BetaWarning)
]))
"""


def test_code_location_loads_without_superseded_or_deprecated_api() -> None:
    """A fresh process loading the code location hears only beta notices (code
    references and the like): nothing superseded, deprecated or in preview."""
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WARNINGS], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []


def _materialized_at(instance: dg.DagsterInstance, key: str, when: datetime) -> None:
    """A materialization of ``key`` recorded as made at ``when``."""
    from dagster._core.events import StepMaterializationData
    from dagster._core.storage.dagster_run import make_new_run_id

    instance.store_event(
        dg.EventLogEntry(
            error_info=None,
            user_message="",
            level="debug",
            run_id=make_new_run_id(),
            timestamp=when.timestamp(),
            dagster_event=dg.DagsterEvent(
                dg.DagsterEventType.ASSET_MATERIALIZATION.value,
                "freshness_test",
                event_specific_data=StepMaterializationData(
                    materialization=dg.AssetMaterialization(asset_key=key)
                ),
            ),
        )
    )


def _freshness_states(instance: dg.DagsterInstance, workspace) -> dict[str, str]:
    """One pass of Dagster's own freshness daemon over the code location; the states."""
    from dagster._daemon.freshness import FreshnessDaemon

    for _ in FreshnessDaemon().run_iteration(workspace):
        pass
    keys = [dg.AssetKey.from_user_string(name) for name in _STATES_OF]
    records = instance.get_freshness_state_records(keys)
    return {key.to_user_string(): records[key].freshness_state.value for key in keys}


_STATES_OF = ("citizenlab", "fingerprints_dns", "asnmeta", "website_metrics", "fastpath")


def test_stale_assets_fail_freshness_in_the_daemon(tmp_path: Path) -> None:
    """The daemon that `dagster-daemon` runs, over workspace.yaml's code location: data
    past its age, and a daily export missing its window, are reported as failing."""
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster._utils.schedules import get_latest_completed_cron_tick

    root = Path(__file__).resolve().parents[1]
    now = datetime.now(timezone.utc)
    deadline = get_latest_completed_cron_tick(DAILY_EXPORT_DEADLINE_CRON, now, "UTC")
    window_opens = deadline - DAILY_EXPORT_WINDOW  # the 01:00 UTC export
    with (
        dg.instance_for_test(temp_dir=str(tmp_path)) as instance,
        create_test_daemon_workspace_context(
            WorkspaceFileTarget(paths=[str(root / "workspace.yaml")]), instance
        ) as workspace,
    ):
        _materialized_at(instance, "citizenlab", now - timedelta(hours=1))
        _materialized_at(instance, "fingerprints_dns", now - timedelta(hours=3, minutes=5))
        _materialized_at(instance, "website_metrics", window_opens - timedelta(minutes=30))
        assert _freshness_states(instance, workspace) == {
            "citizenlab": "PASS",
            "fingerprints_dns": "FAIL",
            "asnmeta": "UNKNOWN",  # never materialized
            "website_metrics": "FAIL",  # only before the schedule's export
            "fastpath": "NOT_APPLICABLE",
        }
        _materialized_at(instance, "website_metrics", window_opens + timedelta(minutes=20))
        _materialized_at(instance, "fingerprints_dns", now - timedelta(minutes=1))
        states = _freshness_states(instance, workspace)
        assert (states["website_metrics"], states["fingerprints_dns"]) == ("PASS", "PASS")


def test_the_operations_guide_states_the_retry_waits_and_which_jobs_get_them() -> None:
    """docs/operations.md ("Operations") gives the retry waits of scheduled runs: the
    ones ``delayed_retry_sensor`` waits (RETRY_WAITS_MIN); every scheduled job but the
    hourly and half-hourly ones is retried, and no job retries inside its run."""
    guide = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
    text = " ".join(guide.read_text().split())
    stated = re.search(
        r"launched by `delayed_retry_sensor` (\d+), (\d+) and (\d+) minutes after each "
        r"failure \(`RETRY_WAITS_MIN` in `ooni_pipeline/common.py`; tags `ooni/attempt`, "
        r"`ooni/retry_of`\), (\d+) times",
        text,
    )
    assert stated, "docs/operations.md no longer states the retry waits"
    *waits, retries = map(int, stated.groups())
    assert tuple(waits) == RETRY_WAITS_MIN and retries == len(RETRY_WAITS_MIN)
    repo = defs.get_repository_def()
    tags = {s.name: repo.get_job(s.job_name).tags.get(MAX_RETRIES_TAG) for s in repo.schedule_defs}
    assert {name for name, t in tags.items() if t != str(retries)} == {
        "citizenlab_schedule",
        "fingerprints_schedule",
        "fastpath_observation_schedule",
    }
    assert all(repo.get_job(s.job_name).op_retry_policy is None for s in repo.schedule_defs)
    sensor = repo.get_sensor_def("delayed_retry_sensor")
    assert {j.name for j in sensor.jobs} >= {
        s.job_name for s, t in zip(repo.schedule_defs, tags.values(), strict=True) if t == "3"
    }
