"""End to end: `dagster dev` (webserver + daemon) on 127.0.0.1, driven through its GraphQL API.

Uses its own OONI_DATA_DIR (chdb allows one data directory per process, and this
test process holds the suite's), local upstreams, and a local webhook receiver.
Schedules start stopped (``OONI_SCHEDULES_DEFAULT=stopped``): a tick during the test
would run an updater against its default upstream on the internet. Only the failure
alert sensor, which the test exercises, runs.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient

from ooni_pipeline_tests.rig import GitRepo, UpstreamServer
from ooni_pipeline_tests.test_test_lists import EXPECTED, LISTS

REPO_ROOT = Path(__file__).resolve().parents[1]
DAY = "2024-03-10"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _embedded_sql(data_dir: Path, sql: str) -> list:
    """Run a query against the dev server's embedded ClickHouse, from a separate process."""
    script = (
        "import json, sys\n"
        "from ooni_pipeline.clickhouse import ClickHouse\n"
        f"with ClickHouse('chdb://{data_dir / 'clickhouse'}', lock_timeout_s=120) as ch:\n"
        "    print(json.dumps([list(r) for r in ch.query_rows(sys.argv[1])], default=str))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, sql], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("e2e")
    data_dir, home = base / "data", base / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    upstream = UpstreamServer()
    repo = GitRepo(base / "test-lists")
    repo.commit(LISTS)
    # A day of fastpath rows, written before the server starts (it holds no lock itself).
    setup = (
        "from datetime import datetime\n"
        "import pandas as pd\n"
        "from ooni_pipeline.clickhouse import ClickHouse\n"
        "from ooni_pipeline.clickhouse.schema import ensure_tables\n"
        f"with ClickHouse('chdb://{data_dir / 'clickhouse'}') as ch:\n"
        "    ensure_tables(ch, 'fastpath')\n"
        "    ch.insert_df('fastpath', pd.DataFrame({'measurement_uid': ['m1', 'm2'], 'test_name': 'web_connectivity',"
        f" 'measurement_start_time': [datetime(2024, 3, 10, 1), datetime(2024, 3, 10, 2)], 'anomaly': ['f', 't'],"
        " 'blocking_type': ['', 'dns'], 'msm_failure': 'f', 'confirmed': 'f', 'probe_cc': 'IT', 'probe_asn': 1,"
        " 'input': 'https://x.org/', 'domain': 'x.org'}))\n"
    )
    subprocess.run([sys.executable, "-c", setup], check=True, timeout=120)
    port = _free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "OONI_DATA_DIR": str(data_dir),
        "OONI_TEST_LISTS_REPO": repo.url,
        "OONI_ALERT_WEBHOOK_URL": upstream.url("alerts/hook"),
        "OONI_DAGSTER_URL": f"http://127.0.0.1:{port}",
        "OONI_SCHEDULES_DEFAULT": "stopped",
    }
    for name in ("OONI_CLICKHOUSE_URL", "OONI_S3_BUCKET"):
        env.pop(name, None)
    log = open(base / "dagster-dev.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dagster",
            "dev",
            "-w",
            str(REPO_ROOT / "workspace.yaml"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=60)
    deadline = time.monotonic() + 180
    while True:
        try:
            result = client._execute(
                "{ repositoriesOrError { ... on RepositoryConnection { nodes { name } } } }"
            )
            if result["repositoriesOrError"].get("nodes"):
                break
        except Exception:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            log.flush()
            pytest.fail(
                f"dagster dev did not come up:\n{(base / 'dagster-dev.log').read_text()[-3000:]}"
            )
        time.sleep(1)
    yield {
        "client": client,
        "data_dir": data_dir,
        "upstream": upstream,
        "log": base / "dagster-dev.log",
    }
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    upstream.close()
    log.close()


def _wait(client: DagsterGraphQLClient, run_id: str, timeout_s: float = 240) -> DagsterRunStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_run_status(run_id)
        if status in (
            DagsterRunStatus.SUCCESS,
            DagsterRunStatus.FAILURE,
            DagsterRunStatus.CANCELED,
        ):
            return status
        time.sleep(1)
    raise AssertionError(f"run {run_id} still {status} after {timeout_s} s")


SMALL_BOUNDS = {
    "ops": {"citizenlab": {"config": {"min_rows_exclusive": 1, "max_rows_exclusive": 100}}}
}


def test_assets_and_schedules_are_listed_and_only_the_alert_sensor_runs(dev_server) -> None:
    result = dev_server["client"]._execute(
        "{ assetNodes { assetKey { path } groupName } "
        "repositoriesOrError { ... on RepositoryConnection { nodes { "
        "schedules { name scheduleState { status } } sensors { name sensorState { status } } "
        "} } } }"
    )
    keys = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in result["assetNodes"]}
    assert keys["citizenlab"] == "test_lists" and keys["website_metrics"] == "exports"
    (repo,) = result["repositoriesOrError"]["nodes"]
    schedules = {s["name"]: s["scheduleState"]["status"] for s in repo["schedules"]}
    assert {"citizenlab_schedule", "fingerprints_schedule", "website_metrics_schedule"} <= set(
        schedules
    )
    assert {name for name, status in schedules.items() if status != "STOPPED"} == set()
    sensors = {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
    assert "website_metrics_automation_sensor" in sensors
    assert {name for name, status in sensors.items() if status == "RUNNING"} == {
        "run_failure_alert_sensor"
    }


def test_materialize_citizenlab_and_a_website_metrics_partition(dev_server) -> None:
    client = dev_server["client"]
    run_id = client.submit_job_execution("citizenlab_job", run_config=SMALL_BOUNDS)
    assert _wait(client, run_id) == DagsterRunStatus.SUCCESS, dev_server["log"].read_text()[-3000:]
    rows = _embedded_sql(
        dev_server["data_dir"],
        "SELECT domain, url, replaceAll(toString(cc), '\\0', ''), category_code FROM citizenlab",
    )
    assert {tuple(r) for r in rows} == EXPECTED

    run_id = client.submit_job_execution("website_metrics_job", tags={"dagster/partition": DAY})
    assert _wait(client, run_id) == DagsterRunStatus.SUCCESS
    obj = dev_server["data_dir"] / "objects" / "exports" / "website_metrics" / f"{DAY}.csv.gz"
    rows = list(csv.reader(io.StringIO(gzip.decompress(obj.read_bytes()).decode())))
    assert len(rows) == 3
    assert rows[2] == [
        "2024-03-10 02:00:00",
        "1",
        "https://x.org/",
        "x.org",
        "https://explorer.ooni.org/m/m2",
        "IT",
    ] + ["0", "1", "0", "0", "0", "0", "0", "0"]


def test_failure_sensor_posts_to_the_webhook(dev_server) -> None:
    client, upstream = dev_server["client"], dev_server["upstream"]
    # The implicit asset job (as the UI's "Materialize" button) has no retry policy.
    run_id = client.submit_job_execution(
        "__ASSET_JOB",
        asset_selection=["citizenlab"],
        run_config={"ops": {"citizenlab": {"config": {"min_rows_exclusive": 1000, "force": True}}}},
    )
    assert _wait(client, run_id) == DagsterRunStatus.FAILURE
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and not upstream.posts:
        time.sleep(2)
    # Nothing runs on its own here, so this run's alert is the only one.
    assert len(upstream.posts) == 1, f"alerts for {run_id}: {upstream.posts}"
    ((path, body),) = upstream.posts
    text = json.loads(body)["text"]
    assert path == "/alerts/hook" and run_id in text
    assert "sanity bounds" in text and "citizenlab" in text
    runs = client._execute("{ runsOrError { ... on Runs { results { runId tags { key } } } } }")
    launched = [
        run["runId"]
        for run in runs["runsOrError"]["results"]
        if {tag["key"] for tag in run["tags"]} & {"dagster/schedule_name", "dagster/sensor_name"}
    ]
    assert launched == []
