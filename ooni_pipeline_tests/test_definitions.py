"""The code location loads, fast and offline, and holds what the contract lists."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ooni_pipeline.definitions import defs


def test_definitions_validate_from_the_command_line() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "definitions",
            "validate",
            "-m",
            "ooni_pipeline.definitions",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_resources_are_bound() -> None:
    repo = defs.get_repository_def()
    assert {"clickhouse", "object_store"} <= set(repo.get_top_level_resources())


def test_asset_materialize_command_on_embedded_defaults(tmp_path) -> None:
    """The contract's CLI command, on the embedded defaults (own chdb dir, local objects)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("OONI_")}
    env.update({"OONI_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path / "home")})
    (tmp_path / "home").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "asset",
            "materialize",
            "-m",
            "ooni_pipeline.definitions",
            "--select",
            "website_metrics",
            "--partition",
            "2016-01-01",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    obj = tmp_path / "data" / "objects" / "exports" / "website_metrics" / "2016-01-01.csv.gz"
    assert obj.is_file()
    assert (tmp_path / "data" / "clickhouse").is_dir()


_LOADED = """
import gc, json, sys
import ooni_pipeline.definitions
print(json.dumps({
    "imported": sorted(
        m for m in ("pandas", "requests", "urllib3", "numpy", "pyarrow") if m in sys.modules
    ),
    "frozen": gc.get_freeze_count(),
}))
"""


def _load_in_fresh_process() -> dict:
    import json

    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _LOADED], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_loading_the_code_location_imports_no_library_only_steps_use() -> None:
    """Every run's process loads the code location first: pandas (the detector, query_df)
    and requests (fetch, the alert) come with the steps that use them, not with the load
    (issue 14: an empty day of website_metrics through the CLI within 4 s)."""
    assert _load_in_fresh_process()["imported"] == []


def test_loading_the_code_location_freezes_its_objects_out_of_the_collector() -> None:
    """The objects made by the load live as long as the process; rescanning them in
    every full collection and at exit cost each CLI run ~0.7 s of CPU."""
    assert _load_in_fresh_process()["frozen"] > 10_000


def test_instance_configs_are_valid(tmp_path) -> None:
    """dagster.yaml (embedded) and the production variant validate against Dagster's schema."""
    import shutil
    from pathlib import Path

    from dagster._core.instance.config import dagster_instance_config

    root = Path(__file__).resolve().parents[1]
    for source in (root / "dagster.yaml", root / "deploy" / "dagster.production.yaml"):
        home = tmp_path / source.stem
        home.mkdir()
        shutil.copy(source, home / "dagster.yaml")
        config, _ = dagster_instance_config(str(home))
        assert config["telemetry"] == {"enabled": False}, source
        assert config["concurrency"]["pools"]["default_limit"] >= 1, source
        # the daemon evaluates the assets' freshness policies
        assert config["freshness"] == {"enabled": True}, source


def test_production_storage_classes_load_from_the_production_extra(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every storage class deploy/dagster.production.yaml names imports from what
    ``.[production]`` installs, and accepts that file's config (no Postgres needed:
    the classes connect only when built)."""
    import importlib
    import importlib.metadata
    import shutil
    from pathlib import Path

    import yaml

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
        import tomli as tomllib
    from dagster._config import process_config, resolve_to_config_type
    from dagster._core.instance.ref import InstanceRef
    from dagster._core.storage.base_storage import DagsterStorage
    from dagster._core.storage.event_log.base import EventLogStorage
    from dagster._core.storage.runs.base import RunStorage
    from dagster._core.storage.schedules.base import ScheduleStorage

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    (pin,) = [r for r in project["optional-dependencies"]["production"] if "dagster-postgres" in r]
    assert pin == f"dagster-postgres=={importlib.metadata.version('dagster-postgres')}"
    # The library release is the one made with the pinned dagster.
    assert f"dagster=={importlib.metadata.version('dagster')}" in (
        importlib.metadata.requires("dagster-postgres") or []
    )
    assert f"dagster=={importlib.metadata.version('dagster')}" in project["dependencies"]

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(root / "deploy" / "dagster.production.yaml", home / "dagster.yaml")
    env = {
        "DAGSTER_PG_HOST": "pg.example.org",
        "DAGSTER_PG_USER": "dagster",
        "DAGSTER_PG_PASSWORD": "not-a-real-password",
        "DAGSTER_PG_DB": "dagster",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ref = InstanceRef.from_dir(str(home))
    expected = {
        "storage_data": DagsterStorage,
        "run_storage_data": RunStorage,
        "event_storage_data": EventLogStorage,
        "schedule_storage_data": ScheduleStorage,
    }
    for field, base in expected.items():
        data = getattr(ref, field)
        assert data.module_name == "dagster_postgres", field
        klass = getattr(importlib.import_module(data.module_name), data.class_name)
        assert issubclass(klass, base), (field, klass)
        result = process_config(
            resolve_to_config_type(klass.config_type()), yaml.safe_load(data.config_yaml)
        )
        assert result.success, (field, result.errors)
        url = result.value["postgres_db"]
        assert url["hostname"] == env["DAGSTER_PG_HOST"] and url["port"] == 5432, field


_DEFAULT_STATUSES = """
import json
from ooni_pipeline.definitions import defs
repo = defs.get_repository_def()
print(json.dumps({d.name: d.default_status.value for d in [*repo.schedule_defs, *repo.sensor_defs]}))
"""


def _default_statuses(schedules_default: str | None) -> subprocess.CompletedProcess:
    """Load the code location in a fresh process (the variable is read at load)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("OONI_")}
    if schedules_default is not None:
        env["OONI_SCHEDULES_DEFAULT"] = schedules_default
    return subprocess.run(
        [sys.executable, "-c", _DEFAULT_STATUSES],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def test_schedules_default_stopped_starts_everything_that_launches_runs_stopped() -> None:
    import json

    def statuses(value: str | None) -> dict[str, str]:
        result = _default_statuses(value)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.splitlines()[-1])

    running = statuses(None)
    assert running == statuses("running")
    # Ingesting OONI's open bucket is opt-in (OONI_PUBLIC_COUNTRIES unset here).
    assert {name for name, status in running.items() if status == "STOPPED"} == {
        "public_fastpath_schedule"
    }

    stopped = statuses("stopped")
    assert stopped.keys() == running.keys()
    assert {name for name, status in stopped.items() if status == "RUNNING"} == {
        "run_failure_alert_sensor"  # it reports failed runs and launches none
    }

    bad = _default_statuses("paused")
    assert bad.returncode != 0 and "OONI_SCHEDULES_DEFAULT must be one of" in bad.stderr
