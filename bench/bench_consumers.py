"""Benchmark: the consumer exports of one day of 2M web_connectivity rows, against
``website_metrics`` alone on the same day.

Run by hand from the repository root (takes a few minutes):

    .venv/bin/python bench/bench_consumers.py [--rows 2000000] [--workdir bench/out/consumers]

Data: bench_website_metrics.setup (2M rows of 2024-03-10, 2% unmerged duplicates,
2% other tests). Each mode runs in its own process as Dagster runs it
(``dg.materialize`` of the assets, metadata, checks off, the manifest written):
  website_metrics  the per-measurement CSV alone
  consumers        everything of issue 16 for that day: the daily aggregate (CSV +
                   Parquet), the per-measurement Parquet, the month's rollup (CSV +
                   Parquet; the month holds only this day) and watchlists of 10
                   consumers x 20 domains, with exports/manifest.json
  watchlists       the watchlists alone (a subset of the daily step), to count scans
Scans: chdb has no ``system.query_log``, so each child counts the queries it sends
that read ``fastpath`` (every ClickHouse call is wrapped to look at its SQL), and
the engine's ``SelectedRows`` profile counter (rows read from MergeTree tables, stage
tables included; ``system.events``, cumulative per process) gives the rows read.
Targets: consumers <= 2x website_metrics (time inside the runs); watchlists at most
one scan of the day more than what every export reads for its data version.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from bench_website_metrics import DAY, setup
from harness import report_peak, run_measured

CONSUMERS = {
    f"newsroom{k}": tuple(f"site{k * 20 + j}.example.org" for j in range(20)) for k in range(10)
}


def _resources(workdir: Path) -> dict:
    from ooni_pipeline.clickhouse import ClickHouseResource
    from ooni_pipeline.object_store import ObjectStoreResource

    return {
        "clickhouse": ClickHouseResource(url=f"chdb://{(workdir / 'clickhouse').absolute()}"),
        "object_store": ObjectStoreResource(local_dir=str((workdir / "objects").absolute())),
    }


def _selected_rows(resources: dict) -> tuple[int, int]:
    with resources["clickhouse"].connect() as ch:
        events = dict(
            ch.query_rows(
                "SELECT event, value FROM system.events WHERE event IN ('SelectedRows', 'SelectQuery')"
            )
        )
        rows = ch.scalar("SELECT count() FROM fastpath")
    return int(events.get("SelectedRows", 0)), int(rows)


FASTPATH_QUERIES: list[str] = []


def _count_fastpath_queries() -> None:
    """Wrap the ClickHouse calls of this process to count queries reading fastpath."""
    import re

    from ooni_pipeline.clickhouse.connection import ClickHouse

    reads = re.compile(r"\bFROM\s+fastpath\b", re.IGNORECASE)
    for name in ("command", "query_rows", "query_df", "_raw_stream"):
        original = getattr(ClickHouse, name)

        def wrapped(self, sql, *args, _original=original, **kwargs):
            if reads.search(sql) and "count() FROM fastpath" not in sql:
                FASTPATH_QUERIES.append(" ".join(sql.split())[:60])
            return _original(self, sql, *args, **kwargs)

        setattr(ClickHouse, name, wrapped)


def _materialize(groups: list[tuple[list, list | None, str]], workdir: Path) -> None:
    import dagster as dg

    resources = _resources(workdir)
    _count_fastpath_queries()
    before, fastpath_rows = _selected_rows(resources)
    instance = dg.DagsterInstance.ephemeral()
    start = time.monotonic()
    for assets, selection, partition in groups:
        result = dg.materialize(
            assets,
            selection=selection,
            resources=resources,
            partition_key=partition,
            instance=instance,
        )
        assert result.success
    elapsed = time.monotonic() - start
    after, _ = _selected_rows(resources)
    rows_read = (after - before) / fastpath_rows
    print(
        f"in_runs={elapsed:.2f}s queries_reading_fastpath={len(FASTPATH_QUERIES)} "
        f"rows_read_per_fastpath_row={rows_read:.2f}"
    )


def run_website_metrics(workdir: Path) -> None:
    from ooni_pipeline.exports.website_metrics import website_metrics

    _materialize([([website_metrics], None, DAY)], workdir)


def run_consumers(workdir: Path) -> None:
    from ooni_pipeline.exports.aggregates import website_metrics_monthly
    from ooni_pipeline.exports.daily_consumers import build_daily_consumer_exports

    daily, _ = build_daily_consumer_exports(CONSUMERS)
    _materialize([([daily], None, DAY), ([website_metrics_monthly], None, DAY[:7])], workdir)


def run_watchlists(workdir: Path) -> None:
    from ooni_pipeline.exports.daily_consumers import build_daily_consumer_exports
    from ooni_pipeline.exports.watchlists import asset_key

    daily, _ = build_daily_consumer_exports(CONSUMERS)
    _materialize([([daily], [asset_key(c) for c in CONSUMERS], DAY)], workdir)


MODES = {
    "website_metrics": run_website_metrics,
    "consumers": run_consumers,
    "watchlists": run_watchlists,
}


def _figure(output: str, name: str) -> float:
    return float(next(p.split("=")[1].rstrip("s") for p in output.split() if p.startswith(name)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/consumers"))
    parser.add_argument("--run", choices=sorted(MODES))
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if args.run:
        MODES[args.run](args.workdir)
        report_peak()
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    setup(args.workdir, args.rows)
    results: dict[str, list[tuple[float, float, str]]] = {m: [] for m in MODES}
    for _ in range(args.repeat):
        for mode in MODES:
            results[mode].append(
                run_measured([__file__, "--run", mode, "--workdir", str(args.workdir)])
            )
    best = {m: min(r, key=lambda x: _figure(x[2], "in_runs")) for m, r in results.items()}
    for mode, (wall, rss, out) in best.items():
        print(f"{mode:16s} process wall {wall:7.2f} s  peak RSS {rss:7.0f} MB  {out}")
    ours = _figure(best["consumers"][2], "in_runs")
    alone = _figure(best["website_metrics"][2], "in_runs")
    print(f"consumers / website_metrics (time in runs): {ours / alone:.2f}x (target <= 2)")
    scans = {m: int(_figure(best[m][2], "queries_reading_fastpath")) for m in MODES}
    print(
        f"queries reading fastpath: website_metrics {scans['website_metrics']}, "
        f"consumers {scans['consumers']}, watchlists of 10 x 20 domains alone "
        f"{scans['watchlists']} (the data-version query + the one stage of the day)"
    )


if __name__ == "__main__":
    main()
