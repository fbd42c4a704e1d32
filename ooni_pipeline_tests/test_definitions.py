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
