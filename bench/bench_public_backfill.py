"""Benchmark: a 30-upload-day backfill of public_fastpath launched as users launch it,
and the downstream runs that follow it.

Run by hand from the repository root (~20 minutes, plus generating the data once):

    .venv/bin/python bench/bench_public_backfill.py [--days 30] [--measurements 20000]
        [--workdir bench/out/public_backfill]

What users run, on the embedded defaults: ``dagster dev`` (webserver + daemon, the
project's dagster.yaml in a fresh DAGSTER_HOME: at most 4 runs at once, pool
``clickhouse`` limit 1) and, in the UI, "Materialize" of ``public_fastpath`` over the
partition range, which sends the GraphQL mutation ``launchPartitionBackfill`` this script
sends. The CLI's ``--partition-range`` is not what users can run here: it requires a
single-run backfill policy, and public_fastpath's is ``multi_run(7)`` (a failed upload
day retries a week, not the month). The schedules that need the internet (test lists,
fingerprints, ASN metadata, GeoIP: none here) are stopped first; every sensor runs.

The data: ``--days`` upload days from 2024-01-01, each ``--measurements`` web_connectivity
measurements packed as OONI's uploader does (bench_public_fastpath's generator, 12
countries x 2 hours), one in ten measured the day before it was uploaded (so a measurement
day is written by two upload days, as in OONI's bucket). A moto server on 127.0.0.1 serves
them anonymously.

Phase 1, the backfill: from the mutation to its last run's end (and to the backfill's
status), each run's time to its first step (the worker's start and the wait for the pool's
slot) and its steps, peak memory of the whole ``dagster dev`` process tree
(webserver, daemon, code servers, run workers; sampled every 2 s) and of its largest
process, and every other run launched meanwhile (the automation sensors' re-exports and
re-detections: these must wait for the backfill). Phase 2, the settle tick: ``dagster
dev`` again with ``OONI_REEXPORT_CRON`` every minute (the daily 04:30 tick, brought
forward), until three minutes pass with no run: the runs the automation launched, and how
many times each downstream partition was materialized in both phases (must be once).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import psutil
import requests
from bench_public_fastpath import generate, ours_env, serve_bucket
from harness import ROOT

INTERNET_SCHEDULES = (
    "citizenlab_schedule",
    "fingerprints_schedule",
    "asnmeta_schedule",
    "geoip_db_schedule",
)
DOWNSTREAM = (
    "website_metrics",
    "website_metrics_daily",
    "website_metrics_parquet",
    "website_metrics_monthly",
    "blocking_status",
    "blocking_events",
)
LAUNCH = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""
DAGSTER = Path(sys.executable).with_name("dagster")


def upload_days(count: int) -> list[str]:
    return [(date(2024, 1, 1) + timedelta(days=n)).isoformat() for n in range(count)]


class TreeMemory:
    """Peak memory of a process tree, sampled every 2 s (reading smaps costs CPU): the
    sum of the processes' unique memory (USS: forked workers share pages, which RSS would
    count again) and the largest process's RSS."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak_sum = self.peak_one = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(2.0):
            uss, rss = [], []
            for proc in (self.root, *self.root.children(recursive=True)):
                try:
                    info = proc.memory_full_info()
                except psutil.Error:
                    continue
                uss.append(info.uss)
                rss.append(info.rss)
            self.peak_sum = max(self.peak_sum, sum(uss))
            self.peak_one = max(self.peak_one, max(rss, default=0))

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return self.peak_sum / 2**20, self.peak_one / 2**20


def start_dev(work: Path, endpoint: str, port: int, extra: dict[str, str]) -> subprocess.Popen:
    env = ours_env(work, endpoint) | extra
    log = (work / f"dagster-dev-{port}.log").open("w")
    proc = subprocess.Popen(
        [str(DAGSTER), "dev", "-m", "ooni_pipeline.definitions", "-p", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok:
                return proc
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"dagster dev exited: see {log.name}")
        time.sleep(1)
    raise SystemExit("dagster dev did not answer in 3 minutes")


def stop_dev(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_rows(instance, since: float) -> list[dict]:
    """Every run created after ``since``: what it targeted, when it ran, its step."""
    import dagster as dg
    from dagster._core.storage.dagster_run import RunsFilter

    rows = []
    for record in instance.get_run_records(RunsFilter(created_after=_dt(since))):
        run = record.dagster_run
        starts: dict[str, float] = {}
        steps, run_start = 0.0, None
        for e in instance.all_logs(run.run_id):
            kind = e.dagster_event_type
            if kind == dg.DagsterEventType.RUN_START:
                run_start = e.timestamp
            elif kind == dg.DagsterEventType.STEP_START:
                starts[e.step_key] = e.timestamp
            elif kind in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
                steps += e.timestamp - starts.get(e.step_key, e.timestamp)
        rows.append(
            {
                "run": run.run_id[:8],
                "status": run.status.value,
                "assets": sorted(k.to_user_string() for k in run.asset_selection or ()),
                "partitions": run.tags.get("dagster/asset_partition_range_start", "")
                + (
                    ".." + run.tags.get("dagster/asset_partition_range_end", "")
                    if run.tags.get("dagster/asset_partition_range_end")
                    else run.tags.get("dagster/partition", "")
                ),
                "backfill": run.tags.get("dagster/backfill", ""),
                "created": record.create_timestamp.timestamp(),
                "started": record.start_time,
                "ended": record.end_time,
                # the worker's start and the wait for the pool's slot
                "to_first_step": min(starts.values()) - run_start if starts and run_start else None,
                "step": steps if starts else None,
            }
        )
    return sorted(rows, key=lambda r: r["created"])


def _dt(ts: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


def expected_partitions(days: list[str]) -> dict[str, set[str]]:
    """The downstream partitions the backfill's rows fall in: the measurement days
    (one in ten measured the day before its upload day), their months, their hours
    from the detector's first."""
    first = date.fromisoformat(days[0]) - timedelta(days=1)
    measured = [(first + timedelta(days=n)).isoformat() for n in range(len(days) + 1)]
    hours = {
        f"{day}-{hour:02d}:00" for day in measured if day >= "2024-01-01" for hour in range(24)
    }
    months = {day[:7] for day in measured}
    return {
        "website_metrics": set(measured),
        "website_metrics_daily": set(measured),
        "website_metrics_parquet": set(measured),
        "website_metrics_monthly": months,
        "blocking_status": hours,
        "blocking_events": hours,
    }


def materializations(instance, since: float) -> dict[str, dict[str, int]]:
    """How many runs materialized each downstream partition after ``since`` (an export
    records a day as it is published and again at the step's end: runs are counted)."""
    import dagster as dg

    out: dict[str, dict[str, int]] = {}
    for name in DOWNSTREAM:
        runs: dict[str, set[str]] = {}
        for record in instance.fetch_materializations(dg.AssetKey(name), limit=10_000).records:
            if record.timestamp >= since:
                runs.setdefault(record.partition_key or "", set()).add(record.run_id)
        out[name] = {key: len(ids) for key, ids in runs.items()}
    return out


def describe(rows: list[dict], t0: float) -> list[str]:
    lines = []
    for r in rows:
        started = f"{r['started'] - t0:7.1f}" if r["started"] else "      -"
        ended = f"{r['ended'] - t0:7.1f}" if r["ended"] else "      -"
        wait = f"{r['to_first_step']:6.1f}" if r["to_first_step"] is not None else "     -"
        step = f"{r['step']:6.1f}" if r["step"] is not None else "     -"
        lines.append(
            f"  {r['run']} {r['status']:8s} start {started} end {ended} to first step {wait} "
            f"steps {step}  {','.join(r['assets'])} {r['partitions']}"
            + (f"  [backfill {r['backfill']}]" if r["backfill"] else "")
        )
    return lines


def wait_quiet(instance, since: float, quiet_s: float, timeout_s: float) -> None:
    """Until no run is queued or running and none was created for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = run_rows(instance, since)
        busy = [r for r in rows if r["status"] in ("QUEUED", "STARTING", "STARTED", "NOT_STARTED")]
        last = max([since, *(r["created"] for r in rows), *(r["ended"] or 0 for r in rows)])
        if not busy and time.time() - last > quiet_s:
            return
        time.sleep(5)
    print("timed out waiting for the runs to end", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--measurements", type=int, default=20_000)
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/public_backfill"))
    parser.add_argument("--port", type=int, default=3071)
    args = parser.parse_args()

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    work = args.workdir.absolute()
    days = upload_days(args.days)
    cans = {
        day: generate(work / "postcans" / day, args.measurements, day=day, late_every=10)["cans"]
        for day in days
    }
    total = sum(c[1] for day in days for c in cans[day])
    compressed = sum(c[3] for day in days for c in cans[day]) / 1e6
    server, endpoint = serve_bucket(
        [(work / "postcans" / day, key) for day in days for key, *_ in cans[day]]
    )
    print(f"{len(days)} upload days, {total} measurements, {compressed:.0f} MB", flush=True)

    # a fresh deployment: instance, chdb with the fingerprints and a watchlist
    for sub in ("home", "data"):
        shutil.rmtree(work / sub, ignore_errors=True)
    (work / "home").mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", work / "home" / "dagster.yaml")
    env = ours_env(work, endpoint)
    subprocess.run(
        [sys.executable, str(ROOT / "bench/bench_public_fastpath.py"), "--run", "setup",
         "--workdir", str(work / "data"), "--endpoint", endpoint],
        check=True, env=env, cwd=ROOT,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-c", WATCHLIST, str(work / "data")], check=True, env=env, cwd=ROOT
    )
    for name in INTERNET_SCHEDULES:
        subprocess.run(
            [str(DAGSTER), "schedule", "stop", name, "-m", "ooni_pipeline.definitions"],
            check=True, env=env, cwd=ROOT, capture_output=True,
        )  # fmt: skip

    from dagster import DagsterInstance

    instance = DagsterInstance.from_config(str(work / "home"))
    lines = [
        f"bench/bench_public_backfill.py --days {args.days} --measurements {args.measurements}: "
        f"{len(days)} upload days {days[0]}..{days[-1]}, {total} measurements, {compressed:.0f} MB "
        f"compressed; {os.cpu_count()} cores; load before {os.getloadavg()[0]:.2f}"
    ]

    # phase 1: the backfill, launched as the UI launches it
    dev = start_dev(work, endpoint, args.port, {})
    memory = TreeMemory(dev.pid)
    t0 = time.time()
    answer = requests.post(
        f"http://127.0.0.1:{args.port}/graphql",
        json={
            "query": LAUNCH,
            "variables": {
                "params": {
                    "assetSelection": [{"path": ["public_fastpath"]}],
                    "partitionNames": days,
                    "fromFailure": False,
                }
            },
        },
        timeout=120,
    ).json()
    result = answer["data"]["launchPartitionBackfill"]
    if result["__typename"] != "LaunchBackfillSuccess":
        raise SystemExit(f"backfill not launched: {result}")
    backfill_id = result["backfillId"]
    print(f"backfill {backfill_id} launched", flush=True)
    while (backfill := instance.get_backfill(backfill_id)).status.value in ("REQUESTED",):
        time.sleep(2)
    t1 = time.time()
    print(f"backfill {backfill.status.value} after {t1 - t0:.1f} s", flush=True)
    time.sleep(90)  # the sensors' next ticks, still under the backfill's deployment
    wait_quiet(instance, t0, quiet_s=120, timeout_s=3600)
    rows1 = run_rows(instance, t0)
    peak_sum, peak_one = memory.stop()
    stop_dev(dev)
    ours = [r for r in rows1 if r["backfill"] == backfill_id]
    others = [r for r in rows1 if r["backfill"] != backfill_id]
    steps = sum(r["step"] or 0 for r in ours)
    last = max(r["ended"] for r in ours)
    lines += [
        f"phase 1, the backfill ({len(ours)} runs, {backfill.status.value}): its last run ended "
        f"{last - t0:.1f} s after the mutation ({len(days) / (last - t0) * 3600:.0f} upload days/hour, "
        f"{total / (last - t0):.0f} measurements/s), the backfill marked done at {t1 - t0:.1f} s; "
        f"the runs' steps {steps:.1f} s ({steps / (last - t0):.0%} of the first figure); peak "
        f"memory of the dagster dev tree (USS summed) {peak_sum:.0f} MB, largest process (RSS) "
        f"{peak_one:.0f} MB, sampled until the runs after it ended; load after {os.getloadavg()[0]:.2f}",
        "  runs (seconds from the mutation):",
        *describe(rows1, t0),
    ]
    during = [r for r in others if r["created"] < last]
    lines.append(
        f"  other runs created while the backfill ran: {len(during)}; after it, before the "
        f"settle tick: {len(others) - len(during)}"
    )
    print("\n".join(lines), flush=True)

    # phase 2: the settle tick, brought forward
    t2 = time.time()
    dev = start_dev(work, endpoint, args.port, {"OONI_REEXPORT_CRON": "* * * * *"})
    time.sleep(75)
    wait_quiet(instance, t2, quiet_s=180, timeout_s=3600)
    rows2 = run_rows(instance, t2)
    stop_dev(dev)
    counts = materializations(instance, t0)
    lines += [
        f"phase 2, the settle tick: {len(rows2)} runs, {sum((r['ended'] or t2) - (r['started'] or t2) for r in rows2):.1f} s of runs",
        *describe(rows2, t2),
        "runs that materialized each downstream partition, both phases:",
    ]
    expected = expected_partitions(days)
    for name, per in counts.items():
        missing = len(expected[name] - set(per))
        spread: dict[int, int] = {}
        for n in per.values():
            spread[n] = spread.get(n, 0) + 1
        lines.append(
            f"  {name:24s} {len(per):4d} partitions, "
            + (", ".join(f"{k} by {n} run(s)" for n, k in sorted(spread.items())) or "none")
            + f"; expected {len(expected[name])}, missing {missing}"
        )
    server.stop()
    text = "\n".join(lines)
    print(text)
    (work / "result.txt").write_text(text + "\n")


# the detector watches CitizenLab's global GRP entries: the sample measurements' domains
WATCHLIST = """
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from harness import insert_grp_watchlist, open_chdb
from ooni_pipeline.clickhouse.schema import ensure_tables
from urllib.parse import urlsplit
import json
data = Path("ooni_pipeline_tests/data/ooni")
domains = sorted({urlsplit(json.loads((data / f"msm_{i}.json").read_text())["input"]).hostname
                  for i in range(1, 11)} - {None})
with open_chdb(Path(sys.argv[1])) as ch:
    ensure_tables(ch, "citizenlab")
    insert_grp_watchlist(ch, domains)
print("watchlist", domains)
"""

if __name__ == "__main__":
    sys.exit(main())
