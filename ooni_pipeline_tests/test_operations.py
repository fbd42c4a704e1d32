"""Failure alerts and freshness checks."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from ooni_pipeline.definitions import defs
from ooni_pipeline.operations.alerts import run_failure_alert_sensor
from ooni_pipeline.operations.freshness import WITHOUT_FRESHNESS
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


def test_every_asset_is_described_owned_and_fresh_checked() -> None:
    repo = defs.get_repository_def()
    graph = repo.asset_graph
    check_names = {key.name for key in graph.asset_check_keys}
    fresh = {key.asset_key for key in graph.asset_check_keys if key.name == "freshness_check"}
    exempt = {dg.AssetKey(name) for name in WITHOUT_FRESHNESS}
    assert fresh == set(graph.get_all_asset_keys()) - exempt
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description and len(node.description) > 40, key
        assert node.owners, key
        assert node.kinds, key
        assert "dagster/code_references" in node.metadata, key
    assert any("freshness" in name for name in check_names)
    # Every step that opens ClickHouse, checks included, takes a slot of the pool.
    for checks_def in repo.asset_checks_defs_by_key.values():
        check_keys = list(checks_def.check_keys)
        if any(k.name in ("freshness_check", "geoip_db_lookup_check") for k in check_keys):
            continue
        assert checks_def.node_def.pools == {"clickhouse"}, check_keys
    sensors = {s.name for s in repo.sensor_defs}
    assert {"run_failure_alert_sensor", "freshness_checks_sensor"} <= sensors
    for schedule in repo.schedule_defs:
        assert schedule.execution_timezone == "UTC"
        # Ingesting OONI's bucket is opt-in (OONI_PUBLIC_COUNTRIES unset here).
        expected = (
            dg.DefaultScheduleStatus.STOPPED
            if schedule.name == "public_fastpath_schedule"
            else dg.DefaultScheduleStatus.RUNNING
        )
        assert schedule.default_status == expected, schedule.name
