"""Benchmark: the ASN metadata load, streaming vs the straightforward way.

Run by hand from the repository root (about a minute):

    .venv/bin/python bench/bench_asnmeta.py [--asns 150000] [--entries 400000]

A generated AS map (about 150k ASNs, 400k history entries) is served over HTTP on
127.0.0.1; each approach runs in its own process (peak RSS: the child's VmHWM, see harness.py), fetching
and filling ``asnmeta_tmp`` then swapping, on the same chdb directory:
  ours    the asset's path: streamed fetch, incremental parse, validated Arrow
          batches (the asset's default size)
  naive   requests .json() (json.load), a list of row dicts, one DataFrame insert
Targets: ours at least 2x faster and at most half the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from datetime import datetime
from pathlib import Path

from harness import open_chdb, report_peak, run_measured


def run_ours(workdir: Path, url: str) -> None:
    from ooni_pipeline.asn_metadata.load import load_asnmeta
    from ooni_pipeline.asn_metadata.parse import ParseStats
    from ooni_pipeline.clickhouse.swap import replace_table
    from ooni_pipeline.fetch import fetch

    stats = ParseStats()
    with open_chdb(workdir) as ch, fetch(url) as fetched:
        result = replace_table(
            ch,
            live="asnmeta",
            staging="asnmeta_tmp",
            fill=lambda ch, t: load_asnmeta(fetched, ch, t, stats),
        )
    print(f"rows={result.rows}")


def run_naive(workdir: Path, url: str) -> None:
    import pandas as pd
    import requests

    from ooni_pipeline.clickhouse.swap import replace_table

    data = requests.get(url, timeout=120).json()
    rows = [
        {
            "asn": int(asn),
            "org_name": entry[0],
            "cc": entry[1],
            "changed": datetime.strptime(entry[2], "%Y%m%d").date(),
            "aut_name": entry[3],
            "source": entry[4],
        }
        for asn, history in data.items()
        for entry in history
    ]
    df = pd.DataFrame(rows)
    df["asn"] = df["asn"].astype("uint32")
    with open_chdb(workdir) as ch:
        result = replace_table(
            ch, live="asnmeta", staging="asnmeta_tmp", fill=lambda ch, t: ch.insert_df(t, df)
        )
    print(f"rows={result.rows}")


MODES = {"ours": run_ours, "naive": run_naive}


def generate(asns: int, entries: int) -> bytes:
    rng = random.Random(42)
    extra = entries - asns
    data = {}
    for asn in rng.sample(range(1, 400_000), asns):
        n = (
            1
            + (1 if rng.random() < extra / asns * 0.6 else 0)
            + (1 if rng.random() < extra / asns * 0.4 else 0)
        )
        data[str(asn)] = [
            [
                f"Organisation {asn} number {i}, Ltd.",
                rng.choice(["IT", "DE", "US", "BR", "IR"]),
                f"20{rng.randint(10, 24)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
                f"AS{asn}-NET",
                "RIPE",
            ]
            for i in range(n)
        ]
    return json.dumps(data).encode()


def measure(mode: str, workdir: Path, url: str) -> tuple[float, float, str]:
    return run_measured([__file__, "--run", mode, "--workdir", str(workdir), "--url", url])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--asns", type=int, default=150_000)
    parser.add_argument("--entries", type=int, default=400_000)
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/asnmeta"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--run", choices=sorted(MODES))
    parser.add_argument("--url")
    args = parser.parse_args()
    if args.run:
        MODES[args.run](args.workdir, args.url)
        report_peak()
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ooni_pipeline_tests.rig import UpstreamServer

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    body = generate(args.asns, args.entries)
    entries = sum(len(v) for v in json.loads(body).values())
    server = UpstreamServer()
    url = server.put("all_as_org_map.json", body)
    print(f"map: {len(body) / 1e6:.1f} MB, {args.asns} ASNs, {entries} entries")
    results: dict[str, list] = {m: [] for m in MODES}
    for _ in range(args.repeat):
        for mode in MODES:
            results[mode].append(measure(mode, args.workdir, url))
    server.close()
    best = {m: min(r, key=lambda x: x[0]) for m, r in results.items()}
    for mode, (wall, rss, out) in best.items():
        print(
            f"{mode:6s} wall {wall:6.2f} s  peak RSS {rss:6.0f} MB  {out}  (walls {[round(r[0], 2) for r in results[mode]]}, RSS {[round(r[1]) for r in results[mode]]})"
        )
    (ow, _, _), (nw, _, _) = best["ours"], best["naive"]
    # Memory: the worst of ours against the best of naive (conservative).
    orss, nrss = max(r[1] for r in results["ours"]), min(r[1] for r in results["naive"])
    print(
        f"naive/ours wall {nw / ow:.2f}x (target >= 2); ours/naive peak RSS {orss / nrss:.2f} (target <= 0.5)"
    )


if __name__ == "__main__":
    main()
