"""Shared by the benchmarks: run one approach in a fresh process and measure it.

Peak memory is the child's own ``VmHWM`` (high-water RSS of its address space,
reset by exec), which it prints as its last line. ``ru_maxrss`` from ``wait4`` is
not used: Linux carries the forking parent's peak across ``execve``, so a driver
holding test data (moto's objects, say) would inflate every child alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

MARKER = "peak_rss_kb="


def report_peak() -> None:
    """Print this process's peak RSS; call last thing in a measured child."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(f"{MARKER}{line.split()[1]}", flush=True)
            return


def open_chdb(workdir: Path):
    """The benchmark's embedded ClickHouse under ``workdir``."""
    from ooni_pipeline.clickhouse import ClickHouse

    return ClickHouse(f"chdb://{(workdir / 'clickhouse').absolute()}")


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall s, peak RSS MB, output) of ``python argv`` in a fresh process."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *argv], stdout=subprocess.PIPE, text=True, env=env or os.environ.copy()
    )
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed with exit code {proc.returncode}")
    lines = proc.stdout.strip().splitlines()
    peak = next(int(line[len(MARKER) :]) for line in reversed(lines) if line.startswith(MARKER))
    output = " ".join(line for line in lines if not line.startswith(MARKER))
    return wall, peak / 1024, output


ROOT = Path(__file__).resolve().parents[1]


def dagster_home() -> Path:
    """A fresh DAGSTER_HOME holding the project's own dagster.yaml: what a user runs."""
    import shutil
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="bench-dagster-home-"))
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


def materialize_argv(select: str, partition: str | None = None) -> list[str]:
    """The shipped path: ``dagster asset materialize`` of the project, default config."""
    argv = [
        str(Path(sys.executable).with_name("dagster")), "asset", "materialize",
        "-m", "ooni_pipeline.definitions", "--select", select,
    ]  # fmt: skip
    return [*argv, "--partition", partition] if partition else argv


def timed_cli(
    argv: list[str], home: Path, workdir: Path
) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall s, peak RSS MB, the process) of a ``dagster`` command ``argv`` as users run
    it: DAGSTER_HOME ``home``, OONI_DATA_DIR ``workdir`` (embedded chdb, local objects),
    schedules stopped. Fails with the CLI's last output if it fails."""
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "OONI_DATA_DIR": str(workdir.absolute()),
        "OONI_SCHEDULES_DEFAULT": "stopped",
        "PYTHONPATH": str(ROOT),
    }
    for name in ("OONI_S3_BUCKET", "OONI_CLICKHOUSE_URL", "OONI_WATCHLISTS"):
        env.pop(name, None)
    start = time.monotonic()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "maxrss_kb=%M", *argv],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"the CLI failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1].split("=")[1])
    return wall, peak_kb / 1024, proc


def moto_client(endpoint: str):
    """A boto3 S3 client of the moto server at ``endpoint`` (moto's test credentials)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def insert_grp_watchlist(ch, domains) -> None:
    """``domains`` as CitizenLab's global GRP entries: what the detector watches."""
    import pandas as pd

    rows = [
        {"domain": d, "url": f"https://{d}/", "cc": "ZZ", "category_code": "GRP"} for d in domains
    ]
    ch.insert_df("citizenlab", pd.DataFrame(rows))
