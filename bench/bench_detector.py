"""Benchmark: the blocking detector over 30 days x 24 hours x 20,000 series.

Run by hand from the repository root (takes a few minutes):

    .venv/bin/python bench/bench_detector.py [--series 20000] [--days 30] [--workdir bench/out/detector]

fastpath gets one web_connectivity measurement per series and hour for 30 days and
two hours more (20,000 series: 50 countries x 100 networks x 4 watched domains; 5%
of the series blocked from day 10 to day 20, 5% background anomalies; 2% of the
measurements inserted twice, as unmerged duplicates). Then, each in its own process
(peak RSS: the child's VmHWM, see harness.py), as the asset runs it
(``detector.pipeline.detect``: status, events, messages, feeds):
  full         all 720 hours in one go, on empty detector tables
  incremental  the hour after them, on the full run's tables
then what users run, the shipped path with its default config:
  cli          ``dagster asset materialize --select blocking_status,blocking_events
               --partition <the next hour>`` on the same data (OONI_DATA_DIR, a fresh
               DAGSTER_HOME with the project's dagster.yaml; peak RSS of the whole
               process tree, from GNU time)
Target: an incremental hour <= 10 s.
"""

from __future__ import annotations

import argparse
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from harness import (
    dagster_home,
    insert_grp_watchlist,
    materialize_argv,
    open_chdb,
    report_peak,
    run_measured,
    timed_cli,
)

START = "2024-03-01 00:00:00"
DOMAINS = ("facebook.com", "twitter.com", "t.me", "youtube.com")


def setup(workdir: Path, series: int, days: int) -> None:

    from ooni_pipeline.clickhouse.schema import ensure_tables

    hours = days * 24 + 2  # the full run, the incremental hour, the CLI hour
    with open_chdb(workdir) as ch:
        ensure_tables(ch, "fastpath", "citizenlab")
        insert_grp_watchlist(ch, DOMAINS)
        ch.command(
            """
            INSERT INTO fastpath (measurement_uid, report_id, input, probe_cc, probe_asn, test_name,
                measurement_start_time, anomaly, confirmed, msm_failure, domain, blocking_type)
            SELECT
                concat('u', toString(number)) AS uid,
                concat('report-', toString(s % 5000)),
                concat('https://', domain, '/'),
                concat(char(65 + intDiv(s % 50, 26)), char(65 + s % 50 % 26)),
                toInt32(1000 + intDiv(s, 50) % 100),
                'web_connectivity',
                toDateTime({start:String}, 'UTC') + toIntervalSecond(h * 3600 + s % 3600),
                if(blocked, if(cityHash64(number) % 10 != 0, 't', 'f'),
                   if(cityHash64(number) % 20 = 0, 't', 'f')) AS anomaly,
                'f',
                if(cityHash64(number, 1) % 50 = 0, 't', 'f'),
                domain,
                if(anomaly = 't', 'dns', '')
            FROM (
                SELECT number, number % {series:UInt64} AS s, intDiv(number, {series:UInt64}) AS h,
                       {domains:Array(String)}[1 + intDiv(s, intDiv({series:UInt64}, 4)) % 4] AS domain,
                       s % 20 = 0 AND h >= 240 AND h < 480 AS blocked
                FROM numbers({rows:UInt64})
            )
            """,
            {
                "start": START,
                "series": series,
                "rows": series * hours,
                "domains": list(DOMAINS),
            },
        )
        ch.command(
            """
            INSERT INTO fastpath (measurement_uid, report_id, input, probe_cc, probe_asn, test_name,
                measurement_start_time, anomaly, confirmed, msm_failure, domain, blocking_type)
            SELECT measurement_uid, report_id, input, probe_cc, probe_asn, test_name,
                measurement_start_time, anomaly, confirmed, msm_failure, domain, blocking_type
            FROM fastpath WHERE cityHash64(measurement_uid) % 50 = 0
            """
        )
        print(f"fastpath rows: {ch.count('fastpath')}")


def run_detection(workdir: Path, first: int, last: int) -> None:
    from datetime import UTC, datetime

    from ooni_pipeline.clickhouse.schema import ensure_tables
    from ooni_pipeline.detector.cusum import CusumParams
    from ooni_pipeline.detector.events import EventParams
    from ooni_pipeline.detector.pipeline import detect
    from ooni_pipeline.detector.status import hour_number
    from ooni_pipeline.object_store import LocalObjectStore

    base = hour_number(datetime.fromisoformat(START))
    with open_chdb(workdir) as ch:
        ensure_tables(ch, "blocking_status", "blocking_events")
        result = detect(
            ch,
            LocalObjectStore(workdir / "objects"),
            base + first,
            base + last,
            list(DOMAINS),
            CusumParams(),
            EventParams(),
            datetime.now(UTC).replace(tzinfo=None),
            log=lambda _: None,
        )
        events = ch.scalar("SELECT count() FROM blocking_events FINAL")
    s = result.status
    print(
        f"hours={s.hours} rows={s.rows} series={s.series} to_blocked={s.changes_to_blocked} "
        f"to_ok={s.changes_to_ok} events={events} detector_s={s.duration_s:.1f}"
    )


def run_cli(workdir: Path, hour: int) -> tuple[float, float, str]:
    """(wall s, peak RSS MB of the process tree, result line) of the CLI for one hour."""
    partition = (datetime.fromisoformat(START) + timedelta(hours=hour)).strftime("%Y-%m-%d-%H:%M")
    home = dagster_home()
    argv = materialize_argv("blocking_status,blocking_events", partition)
    wall, peak_mb, proc = timed_cli(argv, home, workdir)
    shutil.rmtree(home, ignore_errors=True)
    ok = "RUN_SUCCESS" in proc.stderr
    return wall, peak_mb, f"partition={partition} run_success={ok}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--series", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/detector"))
    parser.add_argument("--run", nargs=2, type=int, metavar=("FIRST", "LAST"))
    args = parser.parse_args()
    if args.run:
        run_detection(args.workdir, *args.run)
        report_peak()
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    setup(args.workdir, args.series, args.days)
    last = args.days * 24 - 1
    runs = {"full": (0, last), "incremental": (last + 1, last + 1)}
    for name, (first, end) in runs.items():
        argv = [__file__, "--workdir", str(args.workdir), "--run", str(first), str(end)]
        wall, rss, out = run_measured(argv)
        print(f"{name:12s} wall {wall:7.2f} s  peak RSS {rss:7.0f} MB  {out}")
        if name == "incremental":
            print(f"incremental hour {wall:.2f} s (target <= 10)")
    wall, rss, out = run_cli(args.workdir, last + 2)
    print(f"{'cli':12s} wall {wall:7.2f} s  peak RSS {rss:7.0f} MB  {out}")
    print(f"incremental hour through the CLI, checks included: {wall:.2f} s (target <= 10)")


if __name__ == "__main__":
    main()
