"""Benchmark: the blocking detector's quality, scored as OONI scores its own detector.

Run by hand from the repository root (a few minutes):

    .venv/bin/python bench/bench_detector_quality.py [--countries 24] [--days 21] \
        [--chunk-hours 24] [--variant '{"edd": 5}' ...] [--workdir bench/out/detector_quality]

OONI's scorecard (ooni/data ``oonipipeline/src/oonipipeline/analysis/event_eval.py``,
``oonipipeline event-eval``; ``docs/label-corpus-design.md`` "The harness (W9)"):
event recall by size band, median detection latency, false alerts per quiet
series-week and alerts per true event. OONI replays its CUSUM cold per event over
adjudicated incidents; here the corpus is generated, so every label is exact, and the
detector is the shipped one: the ``blocking_detector`` asset materialized through
Dagster (``dg.materialize`` with the project's resources on embedded chdb, in chunks
of ``--chunk-hours`` partitions, each run a partition range as a backfill runs it;
``--chunk-hours 1`` is the hourly schedule). Its messages go to a webhook on
127.0.0.1 and are counted; ``blocking_events FINAL`` and ``blocking_status FINAL``
are compared to the labels.

Sparsity. Each network's weekly web_connectivity volume per (network, domain) is
drawn from OONI's own sample of series-weeks: the ``random_covered`` stratum of the
quiet-interval corpus (ooni/data ``docs/labels/2026-08-06-interval-labels-arturo.json``,
design ``dffc3c8ebc6``: ``(probe_cc, probe_asn, domain) x ISO week`` drawn at random from
``analysis_web_measurement``, 2026-05-18 .. 2026-08-03, series-weeks with at least 20
measurements, population 265,132). Its 15 series-weeks hold 20 to 506 measurements,
median 94: 0.56 an hour. A probe run tests every watched domain once, so a network's
domains share its runs; runs per hour are Poisson (assumption: OONI publishes no
hour-level distribution).

Scoring (OONI's rules where it has one):
- hit: an event of the labelled (country, domain) starting within ``--tolerance-hours``
  (OONI: 24) of the labelled onset; latency = end of the detecting hour - onset;
- band: ``national`` (every network of a country with >= 5), ``multi_asn`` (2-4),
  ``single_asn`` >= 24 h, ``single_asn`` < 24 h;
- alerts per true event: "blocking started" and "blocking ended" messages whose event
  starts between onset - tolerance and end + tolerance;
- false alerts: "blocking started" messages matching no label; quiet series-weeks:
  every series' hours after the warm-up outside [onset - tolerance, end + tolerance]
  of a label of its (country, domain). Also OONI's own unit: +1 changes of
  ``blocking_status`` on quiet series-hours.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
from harness import insert_grp_watchlist

START = datetime(2024, 3, 1)
DOMAINS = ("facebook.com", "twitter.com", "t.me", "youtube.com", "instagram.com")
# Measurements per (probe_cc, probe_asn, domain) and ISO week, OONI's random_covered
# sample (one value per distinct series-week; see the module docstring).
OONI_WEEKLY_VOLUMES = (96, 95, 87, 97, 37, 112, 94, 33, 20, 43, 130, 506, 118, 101, 39)
NETWORKS_PER_COUNTRY = (1, 2, 3, 4, 5, 6, 8, 10, 12)
BANDS = ("national >=5 nets", "multi_asn 2-4 nets", "single_asn >=24h", "single_asn <24h")


@dataclass
class Label:
    cc: str
    domain: str
    band: str
    networks: list[int]
    onset: int  # hours from START
    end: int  # first hour unblocked


@dataclass
class Corpus:
    series: list[tuple[str, int, str]]
    rates: dict[tuple[str, int], float]  # runs per hour of each network
    labels: list[Label]
    hours: int
    warmup: int
    rows: int = 0
    measured_series_hours: int = 0
    params: dict = field(default_factory=dict)


def build_corpus(args: argparse.Namespace) -> Corpus:
    rng = np.random.default_rng(args.seed)
    hours = args.days * 24
    warmup = args.warmup_days * 24
    domains = DOMAINS[: args.domains]
    nets: dict[str, list[int]] = {}
    rates: dict[tuple[str, int], float] = {}
    for c in range(args.countries):
        cc = chr(65 + c // 26) + chr(65 + c % 26)
        n = NETWORKS_PER_COUNTRY[c % len(NETWORKS_PER_COUNTRY)]
        nets[cc] = [1000 + 10 * c + i for i in range(n)]
        for asn in nets[cc]:
            rates[(cc, asn)] = float(rng.choice(OONI_WEEKLY_VOLUMES)) / 168.0
    labels: list[Label] = []
    pairs = [(cc, d) for cc in nets for d in domains]
    order = rng.permutation(len(pairs))
    k = 0
    for i in order[: int(round(args.event_share * len(pairs)))]:
        cc, domain = pairs[i]
        n = len(nets[cc])
        options = [b for b in BANDS if not (b.startswith("national") and n < 5)]
        options = [b for b in options if not (b.startswith("multi") and n < 2)]
        band = options[k % len(options)]
        k += 1
        if band.startswith("national"):
            chosen = list(nets[cc])
        elif band.startswith("multi"):
            chosen = sorted(
                rng.choice(
                    nets[cc], size=int(rng.integers(2, min(4, n) + 1)), replace=False
                ).tolist()
            )
        else:
            chosen = [int(rng.choice(nets[cc]))]
        duration = int(rng.integers(6, 24)) if band.endswith("<24h") else int(rng.integers(24, 121))
        latest = hours - duration - args.tail_hours
        onset = int(rng.integers(warmup, max(warmup + 1, latest)))
        labels.append(Label(cc, domain, band, chosen, onset, onset + duration))
    series = [(cc, asn, d) for cc in nets for asn in nets[cc] for d in domains]
    return Corpus(series, rates, labels, hours, warmup)


def fastpath_rows(corpus: Corpus, args: argparse.Namespace):
    """The generated measurements, as a DataFrame of fastpath rows."""
    import pandas as pd

    rng = np.random.default_rng(args.seed + 1)
    blocked: dict[tuple[str, int, str], tuple[int, int]] = {}
    for lab in corpus.labels:
        for asn in lab.networks:
            blocked[(lab.cc, asn, lab.domain)] = (lab.onset, lab.end)
    domains = DOMAINS[: args.domains]
    cols: dict[str, list] = {
        k: [] for k in ("cc", "asn", "domain", "hour", "minute", "anomaly", "failure")
    }
    measured = 0
    for (cc, asn), rate in corpus.rates.items():
        runs = rng.poisson(rate, corpus.hours)
        for hour in np.nonzero(runs)[0]:
            for _ in range(int(runs[hour])):
                minute = int(rng.integers(0, 60))
                for domain in domains:
                    window = blocked.get((cc, asn, domain))
                    is_blocked = window is not None and window[0] <= hour < window[1]
                    failure = rng.random() < args.failure_rate
                    p = args.block_anomaly if is_blocked else args.noise
                    for key, value in (
                        ("cc", cc), ("asn", asn), ("domain", domain), ("hour", int(hour)),
                        ("minute", minute), ("failure", failure),
                        ("anomaly", (not failure) and rng.random() < p),
                    ):  # fmt: skip
                        cols[key].append(value)
        measured += int((runs > 0).sum()) * len(domains)
    corpus.measured_series_hours = measured
    n = len(cols["cc"])
    corpus.rows = n
    times = [
        START + timedelta(hours=h, minutes=m)
        for h, m in zip(cols["hour"], cols["minute"], strict=True)
    ]
    return pd.DataFrame(
        {
            "measurement_uid": [f"q{i:09d}" for i in range(n)],
            "report_id": [f"r-{cc}-{asn}" for cc, asn in zip(cols["cc"], cols["asn"], strict=True)],
            "input": [f"https://{d}/" for d in cols["domain"]],
            "domain": cols["domain"],
            "probe_cc": cols["cc"],
            "probe_asn": cols["asn"],
            "test_name": "web_connectivity",
            "measurement_start_time": times,
            "test_start_time": times,
            "anomaly": ["t" if a else "f" for a in cols["anomaly"]],
            "confirmed": "f",
            "msm_failure": ["t" if f else "f" for f in cols["failure"]],
            "blocking_type": ["dns" if a else "" for a in cols["anomaly"]],
        }
    )


class Webhook:
    """The alert webhook on 127.0.0.1: keeps every posted text."""

    def __init__(self) -> None:
        texts: list[str] = []
        self.texts = texts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                texts.append(json.loads(body)["text"])
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


_SINCE = re.compile(r"Since (\d{4}-\d\d-\d\d \d\d):00 UTC")
_URL = re.compile(r"https://explorer\.ooni\.org/chart/mat\?\S+")


def parse_message(text: str) -> tuple[str, str, str, int] | None:
    """(kind, cc, domain, start hour from START) of a blocking message, else None."""
    if "blocking started" in text:
        kind = "started"
    elif "blocking ended" in text:
        kind = "ended"
    else:
        return None
    query = parse_qs(urlparse(_URL.findall(text)[-1]).query)
    since = datetime.strptime(_SINCE.search(text).group(1), "%Y-%m-%d %H")
    hour = int((since - START).total_seconds() // 3600)
    return kind, query["probe_cc"][0], query["domain"][0], hour


def run_detector(workdir: Path, corpus: Corpus, args, config: dict, webhook: Webhook):
    """Materialize ``blocking_detector`` over the corpus' hours in chunks; return the
    messages posted during this pass and the wall time."""
    import dagster as dg

    from ooni_pipeline.clickhouse import ClickHouseResource
    from ooni_pipeline.detector import announce
    from ooni_pipeline.detector.assets import blocking_detector
    from ooni_pipeline.detector.status import hour_number
    from ooni_pipeline.object_store import ObjectStoreResource

    resources = {
        "clickhouse": ClickHouseResource(url=f"chdb://{(workdir / 'clickhouse').absolute()}"),
        "object_store": ObjectStoreResource(local_dir=str((workdir / "objects").absolute())),
    }
    instance = dg.DagsterInstance.ephemeral()
    first_message = len(webhook.texts)
    began = time.monotonic()
    runs = 0
    for first in range(0, corpus.hours, args.chunk_hours):
        last = min(first + args.chunk_hours, corpus.hours) - 1
        # The corpus is replayed as if live: news is judged at the chunk's last hour,
        # not against today's clock (every 2024 event would be old news).
        live = hour_number(START + timedelta(hours=last))
        announce.current_hour = lambda live=live: live
        result = dg.materialize(
            [blocking_detector],
            resources=resources,
            instance=instance,
            tags={
                "dagster/asset_partition_range_start": f"{START + timedelta(hours=first):%Y-%m-%d-%H:%M}",
                "dagster/asset_partition_range_end": f"{START + timedelta(hours=last):%Y-%m-%d-%H:%M}",
            },
            run_config={
                "ops": {"blocking_detector": {"config": config}},
                "loggers": {"console": {"config": {"log_level": "WARNING"}}},
            },
            raise_on_error=True,
        )
        assert result.success
        runs += 1
    return webhook.texts[first_message:], time.monotonic() - began, runs


def score(ch, corpus: Corpus, messages: list[str], tol: int) -> dict:
    base = int((START - datetime(1970, 1, 1)).total_seconds() // 3600)
    events = ch.query_rows(
        "SELECT probe_cc, domain, status, onset, "
        "toInt64(toUnixTimestamp(start_hour) / 3600), "
        "toInt64(ifNull(toUnixTimestamp(end_hour), 0) / 3600) "
        "FROM blocking_events FINAL WHERE kind = 'blocking'"
    )
    events = [
        (cc, d, s, o, int(st) - base, (int(en) - base) if int(en) else None)
        for cc, d, s, o, st, en in events
    ]
    parsed = [m for m in (parse_message(t) for t in messages) if m]
    by_pair: dict[tuple[str, str], list[Label]] = {}
    for lab in corpus.labels:
        by_pair.setdefault((lab.cc, lab.domain), []).append(lab)

    def window_of(cc: str, domain: str, hour: int) -> Label | None:
        for lab in by_pair.get((cc, domain), []):
            if lab.onset - tol <= hour <= lab.end + tol:
                return lab
        return None

    per_label = []
    for lab in corpus.labels:
        live = [e for e in events if (e[0], e[1]) == (lab.cc, lab.domain) and e[2] != "withdrawn"]
        in_bracket = [e[4] for e in live if lab.onset - tol <= e[4] <= lab.onset + tol]
        during = [e[4] for e in live if lab.onset - tol <= e[4] <= lab.end + tol]
        mine = [
            m
            for m in parsed
            if (m[1], m[2]) == (lab.cc, lab.domain) and lab.onset - tol <= m[3] <= lab.end + tol
        ]
        overlapping = [e for e in live if lab.onset - tol <= e[4] <= lab.end + tol]
        per_label.append(
            {
                "band": lab.band,
                "label": [lab.cc, lab.domain, lab.networks, lab.onset, lab.end],
                "events": [list(e[2:]) for e in overlapping],
                "hit": bool(in_bracket),
                "found": bool(during),
                "latency": (min(in_bracket) + 1 - lab.onset) if in_bracket else None,
                # hours from the labelled end to the detected one (of the last event)
                "end_lag": (max(e[5] for e in overlapping) - lab.end)
                if overlapping and all(e[5] is not None for e in overlapping)
                else None,
                # What the hourly schedule announces: each event of onset `change` once
                # when it starts, each ended one once when it ends (announce.pending).
                "started": sum(e[3] == "change" for e in overlapping),
                "ended": sum(e[2] == "ended" for e in overlapping),
                "msg_started": sum(m[0] == "started" for m in mine),
                "msg_ended": sum(m[0] == "ended" for m in mine),
            }
        )
    false_started = [e for e in events if e[3] == "change" and window_of(e[0], e[1], e[4]) is None]
    false_messages = [
        m for m in parsed if m[0] == "started" and window_of(m[1], m[2], m[3]) is None
    ]
    false_initial = [e for e in events if e[3] == "initial" and window_of(e[0], e[1], e[4]) is None]

    # Quiet series-hours: after the warm-up, outside every label window of the pair.
    quiet_hours = 0
    for cc, _asn, domain in corpus.series:
        busy = np.zeros(corpus.hours, bool)
        for lab in by_pair.get((cc, domain), []):
            busy[max(0, lab.onset - tol) : lab.end + tol + 1] = True
        busy[: corpus.warmup] = True
        quiet_hours += int((~busy).sum())
    changes = ch.query_rows(
        "SELECT probe_cc, probe_asn, domain, toInt64(toUnixTimestamp(hour) / 3600) "
        "FROM blocking_status FINAL WHERE change = 1"
    )
    blocked_series = {(lab.cc, a, lab.domain): lab for lab in corpus.labels for a in lab.networks}
    false_changes = 0
    for cc, asn, domain, hour in changes:
        hour = int(hour) - base
        if hour < corpus.warmup:
            continue
        if window_of(cc, domain, hour) is None or (cc, int(asn), domain) not in blocked_series:
            false_changes += 1
    weeks = quiet_hours / 168.0
    return {
        "per_label": per_label,
        "false_started": len(false_started),
        "false_messages": len(false_messages),
        "false_initial": len(false_initial),
        "false_changes": false_changes,
        "quiet_series_weeks": weeks,
        "events": len(events),
        "message_texts": messages,
        "messages": len(parsed),
    }


def table(s: dict) -> list[str]:
    out = []
    labs = s["per_label"]
    out.append(f"{'band':22s} {'events':>6s} {'recall':>8s} {'found':>7s} {'median lat h':>12s} "
               f"{'end lag h':>9s} {'started/ev':>10s} {'ended/ev':>9s} {'exactly 1+1':>11s} {'msgs s/e per ev':>15s}")  # fmt: skip
    for band in (*BANDS, "all"):
        rows = labs if band == "all" else [r for r in labs if r["band"] == band]
        if not rows:
            continue
        lat = [r["latency"] for r in rows if r["latency"] is not None]
        hits = [r for r in rows if r["hit"]]
        med = f"{statistics.median(lat):.1f}" if lat else "n/a"
        lags = [r["end_lag"] for r in hits if r["end_lag"] is not None]
        lag = f"{statistics.median(lags):.0f}" if lags else "n/a"
        started = statistics.mean(r["started"] for r in hits) if hits else float("nan")
        ended = statistics.mean(r["ended"] for r in hits) if hits else float("nan")
        exact = sum(r["started"] == 1 and r["ended"] == 1 for r in hits)
        msgs = (
            f"{statistics.mean(r['msg_started'] for r in hits):.2f}/"
            f"{statistics.mean(r['msg_ended'] for r in hits):.2f}"
            if hits
            else "n/a"
        )
        out.append(
            f"{band:22s} {len(rows):6d} {sum(r['hit'] for r in rows) / len(rows):8.0%} "
            f"{sum(r['found'] for r in rows) / len(rows):7.0%} {med:>12s} {lag:>9s} {started:10.2f} "
            f"{ended:9.2f} {exact:>5d}/{len(hits):<5d} {msgs:>15s}"
        )
    w = s["quiet_series_weeks"]
    out.append(
        f"false 'started' alerts {s['false_started']} over {w:.0f} quiet series-weeks: "
        f"{s['false_started'] / w:.4f} per quiet series-week (goal <= 0.01); "
        f"false 'started' messages posted in this pass: {s['false_messages']}"
    )
    out.append(
        f"false +1 changes of blocking_status (OONI's changepoint unit) {s['false_changes']}: "
        f"{s['false_changes'] / w:.4f} per quiet series-week; unannounced 'initial' events "
        f"outside labels: {s['false_initial']}"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--countries", type=int, default=40)
    parser.add_argument("--domains", type=int, default=3)
    parser.add_argument("--days", type=int, default=21)
    parser.add_argument("--warmup-days", type=int, default=4)
    parser.add_argument(
        "--tail-hours", type=int, default=48, help="no label ends later than this before the end"
    )
    parser.add_argument(
        "--event-share",
        type=float,
        default=0.4,
        help="(country, domain) pairs with a labelled block",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=0.05,
        help="anomaly probability of a usable unblocked measurement",
    )
    parser.add_argument(
        "--block-anomaly", type=float, default=0.9, help="anomaly probability when blocked"
    )
    parser.add_argument("--failure-rate", type=float, default=0.03)
    parser.add_argument("--tolerance-hours", type=int, default=24)
    parser.add_argument("--chunk-hours", type=int, default=24)
    parser.add_argument("--seed", type=int, default=25)
    parser.add_argument(
        "--variant", action="append", default=[], help="run config (JSON) of the asset; repeatable"
    )
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/detector_quality"))
    args = parser.parse_args()

    from ooni_pipeline.clickhouse import ClickHouse
    from ooni_pipeline.clickhouse.schema import ensure_tables

    began = time.monotonic()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    corpus = build_corpus(args)
    rows = fastpath_rows(corpus, args)
    db = f"chdb://{(args.workdir / 'clickhouse').absolute()}"
    with ClickHouse(db) as ch:
        ensure_tables(ch, "fastpath", "citizenlab")
        insert_grp_watchlist(ch, DOMAINS[: args.domains])
        ch.insert_df("fastpath", rows)
    volumes = np.array([r * 168 for r in corpus.rates.values()])
    per_hour = np.array(list(corpus.rates.values()))
    print(f"args: {vars(args)}")
    print(
        f"corpus: {len(corpus.series)} series ({args.countries} countries, "
        f"{len(corpus.rates)} networks, {args.domains} domains), {corpus.hours} h, "
        f"{corpus.rows} fastpath rows; labels {len(corpus.labels)}: "
        + ", ".join(f"{b} {sum(lab.band == b for lab in corpus.labels)}" for b in BANDS)
    )
    print(
        f"sparsity: measurements per series-hour mean {per_hour.mean():.2f}, median "
        f"{np.median(per_hour):.2f} (weekly {np.min(volumes):.0f}..{np.max(volumes):.0f}); "
        f"share of series-hours with >= 1 measurement {corpus.measured_series_hours / (len(corpus.series) * corpus.hours):.1%}"
    )
    webhook = Webhook()
    os.environ["OONI_ALERT_WEBHOOK_URL"] = webhook.url
    for name in ("OONI_S3_BUCKET", "OONI_CLICKHOUSE_URL"):
        os.environ.pop(name, None)
    variants = [{}] + [json.loads(v) for v in args.variant]
    for config in variants:
        with ClickHouse(db) as ch:
            for table_name in (
                "blocking_status",
                "blocking_events",
                "blocking_status_redo",
                "blocking_status_tmp",
            ):
                ch.command(f"DROP TABLE IF EXISTS {table_name} SYNC")
        messages, wall, runs = run_detector(args.workdir, corpus, args, config, webhook)
        with ClickHouse(db) as ch:
            s = score(ch, corpus, messages, args.tolerance_hours)
        from ooni_pipeline.detector.assets import BlockingDetectorConfig

        effective = BlockingDetectorConfig(**config)
        print()
        print(f"== detector parameters: {effective.model_dump()} (h = {effective.cusum().h:g})")
        print(
            f"== run config {json.dumps(config) if config else '{} (defaults)'}: {runs} runs of "
            f"{args.chunk_hours} h, {wall:.0f} s; {s['events']} blocking events, {s['messages']} messages"
        )
        for line in table(s):
            print(line)
        detail = args.workdir / f"scored_{variants.index(config)}.json"
        detail.write_text(json.dumps({"config": config, **s}, indent=1, default=str))
        s.pop("message_texts")
    print(f"\ntotal {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
