"""Benchmark: a 30-day backfill of website_metrics from a shell, as users launch it.

Run by hand from the repository root (a few minutes):

    .venv/bin/python bench/bench_backfill.py [--days 30] [--rows 100000] [--workdir bench/out/backfill]

fastpath gets ``--rows`` web_connectivity measurements on each of ``--days`` days from
2024-03-01. Then, each in its own process, on the same chdb data:
  clickhouse  ClickHouse alone writing the identical objects, day after day: the same
              query, gzip at the asset's default level (``INTO OUTFILE ... COMPRESSION``)
  cli         what users run: ``dagster asset materialize -m ooni_pipeline.definitions
              --select website_metrics --partition-range <first>...<last>`` with the
              default config (one run: the single-run backfill policy; the object check
              runs too), a fresh DAGSTER_HOME with the project's dagster.yaml
Reported: wall, the asset step and the check step (from the run's event log), peak
RSS, and what recording each day as it is published costs: the step's time outside
the days' own exports (``duration_s`` of each day: the engine writing and the
reader checking it), i.e. the publishing lock, Dagster's per-day event and the
manifest, per day. Every object is compared, unpacked, with ClickHouse alone's.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import sys
import time
from datetime import date, timedelta
from pathlib import Path

from harness import (
    ROOT,
    dagster_home,
    materialize_argv,
    open_chdb,
    report_peak,
    run_measured,
    timed_cli,
)

FIRST = date(2024, 3, 1)


def days(count: int) -> list[str]:
    return [(FIRST + timedelta(days=n)).isoformat() for n in range(count)]


def setup(workdir: Path, count: int, rows: int) -> None:
    from ooni_pipeline.clickhouse.schema import ensure_tables

    with open_chdb(workdir) as ch:
        ensure_tables(ch, "fastpath")
        ch.command("TRUNCATE TABLE fastpath")
        ch.command(
            """
            INSERT INTO fastpath (measurement_uid, report_id, input, probe_cc, probe_asn, test_name,
                measurement_start_time, anomaly, confirmed, msm_failure, domain, blocking_type)
            SELECT concat('m', toString(number)), concat('r', toString(number % 997)),
                concat('https://site', toString(number % 5000), '.example/', toString(number % 7)),
                ['IT', 'IR', 'CN', 'RU', 'US'][number % 5 + 1], 1000 + number % 300, 'web_connectivity',
                toDateTime({first:String}, 'UTC') + toIntervalSecond(intDiv(number, {rows:UInt64}) * 86400
                    + number % 86400),
                if(number % 11 = 0, 't', 'f'), if(number % 97 = 0, 't', 'f'), if(number % 53 = 0, 't', 'f'),
                concat('site', toString(number % 5000), '.example'),
                ['', '', 'dns', 'tcp_ip', 'http-diff'][number % 5 + 1]
            FROM numbers({total:UInt64})
            """,
            {"first": f"{FIRST} 00:00:00", "rows": rows, "total": rows * count},
        )


def run_clickhouse(workdir: Path, count: int) -> None:
    """ClickHouse alone: each day's query and CSV, gzip at the asset's default level."""
    import chdb
    from bench_website_metrics import export_alone

    out = (workdir / "alone").absolute()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    conn = chdb.connect(str((workdir / "clickhouse").absolute()))
    start = time.monotonic()
    for day in days(count):
        export_alone(conn, out / f"{day}.csv.gz", day)
    query_s = time.monotonic() - start
    conn.close()
    print(f"query_s={query_s:.3f}")
    report_peak()


def run_cli(workdir: Path, count: int) -> dict:
    import dagster as dg

    home = dagster_home()
    span = days(count)
    argv = [*materialize_argv("website_metrics"), "--partition-range", f"{span[0]}...{span[-1]}"]
    wall, peak_mb, proc = timed_cli(argv, home, workdir)
    if "RUN_SUCCESS" not in proc.stderr:
        raise SystemExit(f"the CLI failed:\n{proc.stderr[-3000:]}")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        steps = {
            s.step_key: s.end_time - s.start_time
            for s in instance.get_run_step_stats(runs[0].run_id)
        }
        exported: dict[str, float] = {}  # a day may be recorded twice: counted once
        events = 0
        for record in instance.fetch_materializations(
            dg.AssetKey("website_metrics"), limit=10 * count
        ).records:
            events += 1
            metadata = record.asset_materialization.metadata
            if record.run_id == runs[0].run_id and "duration_s" in metadata:
                exported[record.partition_key] = metadata["duration_s"].value
        exports_s = sum(exported.values())
        checks = [
            e.dagster_event.event_specific_data.passed
            for e in instance.all_logs(runs[0].run_id)
            if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
        ]
    shutil.rmtree(home, ignore_errors=True)
    step = steps.pop("website_metrics")
    return {
        "wall": wall,
        "rss": peak_mb,
        "step": step,
        "check": sum(steps.values()),
        "runs": len(runs),
        "events": events,
        "recording_per_day": (step - exports_s) / count,
        "check_passed": checks == [True],
    }


def unpacked_digest(path: Path) -> str:
    return hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "backfill")
    parser.add_argument("--child", choices=["clickhouse"])
    args = parser.parse_args()
    if args.child == "clickhouse":
        run_clickhouse(args.workdir, args.days)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.workdir / "objects", ignore_errors=True)
    setup(args.workdir, args.days, args.rows)
    print(f"{args.days} days x {args.rows} rows, load {os.getloadavg()[0]:.1f}")
    wall, rss, output = run_measured(
        [__file__, "--child", "clickhouse", "--days", str(args.days), "--rows", str(args.rows),
         "--workdir", str(args.workdir)]
    )  # fmt: skip
    alone = float(output.split("query_s=")[1].split()[0])
    print(f"clickhouse alone: {alone:.2f} s of queries ({wall:.2f} s wall, {rss:.0f} MB)")
    cli = run_cli(args.workdir, args.days)
    print(
        f"cli --partition-range: wall {cli['wall']:.2f} s, step {cli['step']:.2f} s "
        f"({cli['step'] / alone:.2f}x alone), check {cli['check']:.2f} s, peak RSS "
        f"{cli['rss']:.0f} MB, {cli['runs']} run, {cli['events']} materialization events, "
        f"check passed: {cli['check_passed']}"
    )
    print(
        f"the step outside the days' exports (versions, refusals, and per day the publishing "
        f"lock, Dagster's event and the manifest): "
        f"{cli['recording_per_day'] * 1000:.0f} ms per day, "
        f"{cli['recording_per_day'] * args.days:.2f} s of the {args.days}-day step"
    )
    same = all(
        unpacked_digest(args.workdir / "alone" / f"{day}.csv.gz")
        == unpacked_digest(
            args.workdir / "objects" / "exports" / "website_metrics" / f"{day}.csv.gz"
        )
        for day in days(args.days)
    )
    print(f"identical once unpacked: {same}")
    print(f"days per hour: {args.days / cli['wall'] * 3600:.0f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
