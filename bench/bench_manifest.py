"""Benchmark: what recording one more partition in the exports manifest costs after a
long history, before (the single-file manifest of c2dfa82) and after (the tree of
``exports/manifest.json``, asset indexes and monthly shards).

Run by hand from the repository root (takes about a minute):

    PYTHONPATH=. .venv/bin/python bench/bench_manifest.py [--days 100,1000] [--repeat 5]

History: ``days`` days from 2023-01-01 of every export, as the exports record them
(``ooni_pipeline_tests.rig.export_history``): website_metrics, the daily aggregate
(CSV + Parquet), the per-measurement Parquet, 5 watchlists, and the monthly rollup
(CSV + Parquet): 9 assets, ``days`` partitions of each daily one, 9 objects a day.
It is recorded in one call (the same files as ``days`` runs would leave), in a bucket
of moto in its own process on 127.0.0.1, then the next days are recorded one by one
through the shipped ``record_exports`` (the ClickHouse lock ``exports_manifest`` on
chdb included), inside a Dagster run, as the exports call it:
  website_metrics  one day of website_metrics (1 asset, 1 object), as its step does
  consumer_day     one day of the consumer step: daily aggregate, Parquet, 5 watchlists
                   (7 assets, 8 objects) in one call
Counted per recording: S3 requests and the body bytes read and written (botocore's
event hooks on the store's client, ``rig.S3Traffic``); wall time, median of
``repeat`` days, and the time the lock alone takes (taken and released, nothing done).
"before" runs c2dfa82's ``exports/manifest.py`` and ``object_store/manifest.py``
(``git show``) against today's stores and lock: the same code path as then.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from datetime import date, timedelta
from pathlib import Path

from bench_backup import moto_s3
from harness import ROOT, moto_client, report_peak, run_measured

BUCKET = "bench-manifest"
FIRST_DAY = "2023-01-01"
BEFORE = "c2dfa82"


def _old_manifest_module():
    """c2dfa82's ``exports/manifest.py``, on c2dfa82's ``object_store/manifest.py``."""

    def source(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{BEFORE}:{path}"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    helpers = types.ModuleType("old_object_store_manifest")
    exec(source("ooni_pipeline/object_store/manifest.py"), helpers.__dict__)
    sys.modules[helpers.__name__] = helpers
    code = source("ooni_pipeline/exports/manifest.py").replace(
        "from ooni_pipeline.object_store.manifest import", "from old_object_store_manifest import"
    )
    module = types.ModuleType("old_exports_manifest")
    exec(code, module.__dict__)
    return module


def _measure(mode: str, days: int, repeat: int, endpoint: str, workdir: Path) -> None:
    import dagster as dg

    from ooni_pipeline.clickhouse import ClickHouseResource
    from ooni_pipeline.common import one_run_at_a_time
    from ooni_pipeline.exports import manifest as new_manifest
    from ooni_pipeline.exports.aggregates import MONTHLY_KEY
    from ooni_pipeline.exports.website_metrics import WEBSITE_METRICS_KEY
    from ooni_pipeline.object_store import S3ObjectStore
    from ooni_pipeline_tests.rig import S3Traffic, export_history

    module = _old_manifest_module() if mode == "before" else new_manifest
    client = moto_client(endpoint)
    store = S3ObjectStore(client, BUCKET)
    history = export_history(FIRST_DAY, days)
    results: dict[str, list[tuple[float, str]]] = {"website_metrics": [], "consumer_day": []}
    lock_s: list[float] = []

    @dg.asset(required_resource_keys={"clickhouse"})
    def record_manifest(context) -> None:
        with context.resources.clickhouse.connect() as ch:
            module.record_exports(context, ch, store, history)
            traffic = S3Traffic(client)
            for n in range(repeat):
                day = (date.fromisoformat(FIRST_DAY) + timedelta(days=days + n)).isoformat()
                entries = export_history(day, 1)
                del entries[MONTHLY_KEY]
                calls = {
                    "website_metrics": {WEBSITE_METRICS_KEY: entries.pop(WEBSITE_METRICS_KEY)},
                    "consumer_day": entries,
                }
                for what, recorded in calls.items():
                    traffic.clear()
                    start = time.perf_counter()
                    module.record_exports(context, ch, store, recorded)
                    results[what].append((time.perf_counter() - start, traffic.summary()))
                start = time.perf_counter()
                with one_run_at_a_time(context, ch, new_manifest.LOCK_NAME):
                    pass
                lock_s.append(time.perf_counter() - start)

    url = f"chdb://{(workdir / 'clickhouse').absolute()}"
    assert dg.materialize(
        [record_manifest], resources={"clickhouse": ClickHouseResource(url=url)}
    ).success
    top = len(store.read_bytes(new_manifest.MANIFEST_KEY))
    for what, runs in results.items():
        wall = statistics.median(s for s, _ in runs) * 1000
        print(f"{what}: wall_ms={wall:.1f} {runs[0][1]};")
    print(f"lock_alone_ms={statistics.median(lock_s) * 1000:.1f} manifest_json_bytes={top}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--days", default="100,1000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/manifest"))
    parser.add_argument("--run", choices=("before", "after"))
    parser.add_argument("--endpoint")
    args = parser.parse_args()
    if args.run:
        _measure(args.run, int(args.days), args.repeat, args.endpoint, args.workdir)
        report_peak()
        return
    import shutil

    for days in (int(d) for d in args.days.split(",")):
        for mode in ("before", "after"):
            workdir = args.workdir / f"{mode}-{days}"
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            with moto_s3(BUCKET) as (endpoint, _):
                wall, rss, out = run_measured(
                    [__file__, "--run", mode, "--days", str(days), "--repeat", str(args.repeat),
                     "--endpoint", endpoint, "--workdir", str(workdir)]
                )  # fmt: skip
            print(f"days={days:5d} {mode:6s} (process {wall:5.1f} s, peak RSS {rss:4.0f} MB)")
            for part in out.split(";"):
                if part.strip():
                    print(f"    {part.strip()}")


if __name__ == "__main__":
    main()
