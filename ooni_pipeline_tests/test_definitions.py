"""The code location loads, fast and offline, and holds what the contract lists."""

from __future__ import annotations

import subprocess
import sys

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
