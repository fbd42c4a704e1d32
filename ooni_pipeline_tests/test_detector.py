"""The blocking detector on synthetic hourly timelines, in real chdb, with exact events.

Timelines use 20 measurements per series-hour: "ok" hours have 1 anomaly (share
0.05), "blocked" hours 19 (0.95). The event tests run OONI's own parameters
(``OONI_PARAMS``: mu0 0, mu1 0.7, edd 10: h = 3.5, every measured hour weighing 1),
whose arithmetic is slow enough to put each mechanism on a distinct hour: an OK
series turns BLOCKED on its 6th blocked hour (6 x 0.6 = 3.6) and back on its 12th
ok hour (12 x 0.3 = 3.6); a new series is established OK, silently, on its 12th ok
hour. The shipped defaults (edd 6, an hour weighing up to 3 measurements) have
their own tests, ``*_defaults_*``.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta

import dagster as dg
import feedparser
import numpy as np
import pandas as pd
import pytest

from ooni_pipeline.clickhouse import ClickHouse, ClickHouseError
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.detector import announce
from ooni_pipeline.detector.assets import blocking_detector
from ooni_pipeline.detector.cusum import BLOCKED, OK, UNKNOWN, CusumParams, SeriesState, step
from ooni_pipeline.detector.events import event_id
from ooni_pipeline.detector.status import hour_number
from ooni_pipeline_tests.rig import failure_text

T0 = datetime(2024, 3, 1)
H0 = hour_number(T0)
PER_HOUR = 20
OK_LEVEL, BLOCKED_LEVEL = 1, 19  # anomalies out of PER_HOUR
SHIPPED = object()  # detect(..., config=SHIPPED): the asset's defaults


def at(hour: int) -> datetime:
    return T0 + timedelta(hours=hour)


def _rows(
    cc: str,
    asn: int,
    domain: str,
    hour: int,
    anomalies: int,
    tag: str = "",
    per_hour: int = PER_HOUR,
) -> list[dict]:
    rows = []
    for i in range(per_hour):
        blocked = i < anomalies
        rows.append(
            {
                "measurement_uid": f"{tag}{cc}-{asn}-{domain}-{hour}-{i}",
                "report_id": f"r-{cc}-{asn}",
                "input": f"https://{domain}/",
                "domain": domain,
                "probe_cc": cc,
                "probe_asn": asn,
                "test_name": "web_connectivity",
                "measurement_start_time": at(hour) + timedelta(minutes=i),
                "test_start_time": at(hour),
                "anomaly": "t" if blocked else "f",
                "confirmed": "f",
                "msm_failure": "f",
                "blocking_type": "dns" if blocked else "",
            }
        )
    return rows


def insert_timeline(
    ch: ClickHouse,
    cc: str,
    asn: int,
    domain: str,
    levels: dict[int, int],
    tag: str = "",
    per_hour: dict[int, int] | None = None,
) -> None:
    """``levels``: hour -> anomalies out of PER_HOUR measurements, or out of
    ``per_hour[hour]`` (hours left out: no measurements)."""
    per_hour = per_hour or {}
    rows = [
        r
        for hour, n in sorted(levels.items())
        for r in _rows(cc, asn, domain, hour, n, tag, per_hour.get(hour, PER_HOUR))
    ]
    if rows:
        ensure_tables(ch, "fastpath")
        ch.insert_df("fastpath", pd.DataFrame(rows))


def hours(first: int, last: int, level: int) -> dict[int, int]:
    return dict.fromkeys(range(first, last + 1), level)


@pytest.fixture(autouse=True)
def replayed_as_live(monkeypatch) -> None:
    """The timelines are in 2024: news is judged against each pass's last hour, as
    if it ran live, not against today's clock (which would make it all old)."""
    monkeypatch.setattr(announce, "current_hour", lambda: 0)


@pytest.fixture
def watchlist(ch: ClickHouse) -> None:
    ensure_tables(ch, "citizenlab")
    ch.insert_df(
        "citizenlab",
        pd.DataFrame(
            [
                {"domain": "x.com", "url": "https://x.com/", "cc": "ZZ", "category_code": "GRP"},
                {"domain": "t.me", "url": "https://t.me/", "cc": "ZZ", "category_code": "GRP"},
                {
                    "domain": "news.ir",
                    "url": "https://news.ir/",
                    "cc": "IR",
                    "category_code": "GRP",
                },
                {"domain": "b.org", "url": "https://b.org/", "cc": "ZZ", "category_code": "NEWS"},
            ]
        ),
    )


@pytest.fixture
def webhook(upstream, monkeypatch):
    monkeypatch.setenv("OONI_ALERT_WEBHOOK_URL", upstream.url("/hook"))
    return upstream


# OONI's CUSUM as ooni/data runs it: h = 3.5, an hour weighs 1 whatever it measured.
OONI_PARAMS = {"edd": 10.0, "max_hour_weight": 1.0}


def detect(clickhouse, store, first: int, last: int, instance=None, config=None):
    """Detect hours [first, last] as a backfill does, with OONI's parameters
    overridden by ``config`` (``config=SHIPPED`` for the shipped defaults)."""
    config = {} if config is SHIPPED else {**OONI_PARAMS, **(config or {})}
    start, end = at(first), at(last)
    return dg.materialize(
        [blocking_detector],
        resources={"clickhouse": clickhouse, "object_store": store},
        instance=instance or dg.DagsterInstance.ephemeral(),
        tags={
            "dagster/asset_partition_range_start": f"{start:%Y-%m-%d-%H:%M}",
            "dagster/asset_partition_range_end": f"{end:%Y-%m-%d-%H:%M}",
        },
        run_config={"ops": {"blocking_detector": {"config": config}}} if config else None,
        raise_on_error=False,
    )


def events(ch: ClickHouse) -> list[dict]:
    """The stored events, one per row (FINAL: a row updated twice is one row)."""
    df = ch.query_df(
        "SELECT event_id, kind, probe_cc, domain, status, onset, "
        "toInt64(toUnixTimestamp(start_hour) / 3600) AS start, "
        "toInt64(ifNull(toUnixTimestamp(end_hour), 0) / 3600) AS end, "
        "networks, peak_networks, explorer_url, announced "
        "FROM blocking_events FINAL ORDER BY start, probe_cc, domain"
    )
    out = []
    for row in df.to_dict("records"):
        row["start"] -= H0
        row["end"] = row["end"] - H0 if row["end"] else None
        row["networks"] = [int(a) for a in row["networks"]]
        out.append(row)
    return out


def summary(ch: ClickHouse) -> list[tuple]:
    return [
        (
            e["kind"],
            e["probe_cc"],
            e["domain"],
            e["status"],
            e["onset"],
            e["start"],
            e["end"],
            e["networks"],
        )
        for e in events(ch)
    ]


def messages(server, hook: str = "/hook") -> list[str]:
    return [json.loads(body)["text"] for path, body in server.posts if path == hook]


def headlines(server) -> list[str]:
    """Each message's headline after the bot's name ("blocking started", ...)."""
    return [m.split("\n")[0].rsplit(": ", 1)[1] for m in messages(server)]


def status_of(ch: ClickHouse, cc: str, asn: int, domain: str) -> list[tuple]:
    return [
        (int(h) - H0, str(s), int(c))
        for h, s, c in ch.query_rows(
            "SELECT toInt64(toUnixTimestamp(hour) / 3600), state, change FROM blocking_status FINAL "
            "WHERE probe_cc = {cc:String} AND probe_asn = {asn:UInt32} AND domain = {d:String} "
            "ORDER BY hour",
            {"cc": cc, "asn": asn, "d": domain},
        )
    ]


def parse_feed(store, key: str):
    feed = feedparser.parse(store.read_bytes(key))
    assert feed.bozo == 0, feed.get("bozo_exception")
    assert feed.version == "atom10"
    return feed


# -- the state machine alone ------------------------------------------------------------


def test_cusum_step_matches_ooni_thresholds_and_gap_decay() -> None:
    params = CusumParams(**OONI_PARAMS)
    assert params.h == pytest.approx(3.5)
    mem = SeriesState.empty(3)
    idx = np.arange(3)
    twenty = np.full(3, PER_HOUR)
    # 11 ok hours leave every series unknown, the 12th establishes OK silently.
    for hour in range(11):
        assert not step(mem, hour, idx, np.full(3, 0.05), twenty, params).any()
    assert list(mem.state) == [UNKNOWN] * 3
    assert not step(mem, 11, idx, np.full(3, 0.05), twenty, params).any()
    assert list(mem.state) == [OK] * 3
    # Three blocked hours each, then: series 0 next hour, series 1 after 6 silent
    # hours (no decay), series 2 after 72 silent hours (memory decays by 2**-(73/48)).
    for hour in range(12, 15):
        step(mem, hour, idx, np.full(3, 0.95), twenty, params)
    assert mem.s_pos == pytest.approx([1.8] * 3)
    changes = {}
    for hour in range(15, 100):
        due = [i for i, resume in enumerate((15, 21, 87)) if hour >= resume]
        change = step(
            mem, hour, np.array(due, int), np.full(len(due), 0.95), np.full(len(due), 20), params
        )
        for i, c in zip(due, change, strict=True):
            if c:
                changes[i] = hour
    assert changes == {0: 17, 1: 23, 2: 91}
    assert list(mem.state) == [BLOCKED] * 3


def test_cusum_defaults_weigh_an_hour_by_its_measurements_up_to_three() -> None:
    """Shipped defaults: h = 2.1; a blocked measurement adds 0.65, an unblocked one
    takes 0.35 away, an hour counting at most 3 of them. One blocked measurement an
    hour crosses on the 4th hour; two, three or twenty an hour on the 2nd;
    dense hours alternating 0.45 and 0.25 (a threshold's worst case) add 3 x 0.1 and
    take it back, where twenty independent measurements would add 2 at the first."""
    params = CusumParams()
    assert (params.edd, params.max_hour_weight, params.h) == (6.0, 3.0, pytest.approx(2.1))
    mem = SeriesState.empty(5)
    mem.state[:] = OK
    idx = np.arange(5)
    usable = np.array([1, 2, 3, 20, 20])
    first_change = {}
    for hour in range(12):
        share = np.array([1.0, 1.0, 1.0, 1.0, 0.25 if hour % 2 else 0.45])
        change = step(mem, hour, idx, share, usable, params)
        for i in np.flatnonzero(change == 1):
            first_change.setdefault(int(i), hour)
    assert first_change == {0: 3, 1: 1, 2: 1, 3: 1}
    assert mem.state[4] == OK and mem.s_pos[4] == pytest.approx(0.0)
    # The way back: single unblocked measurements take 0.35 an hour off a block;
    # 5 hours (1.75) leave it blocked, 7 (2.45) have ended it.
    mem = SeriesState.empty(1)
    mem.state[:] = BLOCKED
    for hour in range(7):
        step(mem, hour, np.arange(1), np.zeros(1), np.ones(1), params)
        if hour == 4:
            assert mem.state[0] == BLOCKED and mem.s_neg[0] == pytest.approx(1.75)
    assert mem.state[0] == OK


# -- timelines through the asset -------------------------------------------------------------


def test_clean_onset_and_recovery(ch, clickhouse, local_store_resource, watchlist, webhook) -> None:
    levels = hours(0, 23, OK_LEVEL) | hours(24, 47, BLOCKED_LEVEL) | hours(48, 79, OK_LEVEL)
    insert_timeline(ch, "IR", 44244, "x.com", levels)
    insert_timeline(ch, "IR", 44244, "filler.example", hours(0, 79, 0))  # not watched
    instance = dg.DagsterInstance.ephemeral()
    store = local_store_resource.get_store()

    assert detect(clickhouse, local_store_resource, 0, 35, instance).success
    eid = event_id("blocking", "IR", "x.com", H0 + 29)
    assert summary(ch) == [("blocking", "IR", "x.com", "ongoing", "change", 29, None, [44244])]
    assert [e["event_id"] for e in events(ch)] == [eid]
    started = messages(webhook)
    assert len(started) == 1 and "blocking started" in started[0] and "AS44244" in started[0]
    assert (
        "explorer.ooni.org/chart/mat?probe_cc=IR&test_name=web_connectivity&domain=x.com"
        in started[0]
    )
    feed = parse_feed(store, "feeds/blocking/IR.atom")
    assert [e.id for e in feed.entries] == [f"tag:ooni.org,2024:blocking-event:{eid}"]
    assert feed.entries[0].title == "x.com blocked in IR"
    first_updated = feed.entries[0].updated

    assert detect(clickhouse, local_store_resource, 36, 79, instance).success
    assert summary(ch) == [("blocking", "IR", "x.com", "ended", "change", 29, 59, [44244])]
    assert [e["event_id"] for e in events(ch)] == [eid]
    assert events(ch)[0]["announced"] == "ended"
    ended = messages(webhook)[1:]
    assert len(ended) == 1 and "blocking ended" in ended[0]
    states = status_of(ch, "IR", 44244, "x.com")
    assert [(h, c) for h, _, c in states if c] == [(29, 1), (59, -1)]
    assert states[10][1] == "unknown" and states[11][1] == "ok" and states[-1][1] == "ok"
    for key in ("feeds/blocking/IR.atom", "feeds/blocking/global.atom"):
        feed = parse_feed(store, key)
        assert [e.id for e in feed.entries] == [f"tag:ooni.org,2024:blocking-event:{eid}"]
        assert feed.entries[0].title == "x.com reachable again in IR"
        assert feed.entries[0].updated >= first_updated and feed.feed.updated
        assert feed.entries[0].link.startswith("https://explorer.ooni.org/chart/mat?")

    # A rerun of hours already detected changes nothing and sends nothing.
    assert detect(clickhouse, local_store_resource, 50, 52, instance).success
    assert summary(ch) == [("blocking", "IR", "x.com", "ended", "change", 29, 59, [44244])]
    assert len(messages(webhook)) == 2
    assert ch.scalar("SELECT count() FROM blocking_status FINAL") == 80


def test_an_ended_event_is_announced_once_while_another_is_ongoing(
    ch, clickhouse, local_store_resource, watchlist, webhook
) -> None:
    """Found by bench/bench_detector_quality.py: passes after an event's end recomputed
    its episode (from the start of another, still ongoing, event) without reading it
    back, so it was written again unannounced and "ended" was posted by every pass."""
    levels = hours(0, 23, OK_LEVEL) | hours(24, 47, BLOCKED_LEVEL) | hours(48, 90, OK_LEVEL)
    insert_timeline(ch, "IR", 44244, "x.com", levels)
    insert_timeline(ch, "TR", 9121, "t.me", hours(0, 19, OK_LEVEL) | hours(20, 90, BLOCKED_LEVEL))
    instance = dg.DagsterInstance.ephemeral()
    for first, last in ((0, 55), (56, 62), (63, 70), (71, 80)):
        assert detect(clickhouse, local_store_resource, first, last, instance).success
    assert summary(ch) == [
        ("blocking", "TR", "t.me", "ongoing", "change", 25, None, [9121]),
        ("blocking", "IR", "x.com", "ended", "change", 29, 59, [44244]),
    ]
    texts = messages(webhook)
    assert [t.split("\n")[0].rsplit(": ", 1)[1] for t in texts] == [
        "blocking started",
        "blocking started",
        "blocking ended",
    ]
    assert "x.com" in texts[2]


def test_flapping_around_the_threshold_is_no_event_storm(
    ch, clickhouse, local_store_resource, watchlist, webhook
) -> None:
    """Ten networks hovering around the midpoint (shares 0.25 / 0.45 hour by hour,
    a threshold detector's worst case) for a week: no event. One flapping between
    0.05 and 0.95 every hour (mostly blocked): exactly one event, never ended."""
    alternating = {h: (5 if h % 2 else 9) for h in range(24, 24 + 7 * 24)}
    for asn in range(1, 11):
        insert_timeline(ch, "PK", asn, "t.me", hours(0, 23, OK_LEVEL) | alternating)
    hard = {h: (BLOCKED_LEVEL if h % 2 else OK_LEVEL) for h in range(24, 24 + 7 * 24)}
    insert_timeline(ch, "PK", 99, "x.com", hours(0, 23, OK_LEVEL) | hard)
    assert detect(clickhouse, local_store_resource, 0, 24 + 7 * 24 - 1).success
    # Shares 0.05 at even hours, 0.95 at odd ones: s_pos 0.6 + 0.3 per two hours.
    assert summary(ch) == [("blocking", "PK", "x.com", "ongoing", "change", 45, None, [99])]
    assert len(messages(webhook)) == 0  # the onset is older than 48 h before the last hour
    for asn in range(1, 11):
        assert not [c for _, _, c in status_of(ch, "PK", asn, "t.me") if c]


def test_shipped_defaults_find_a_sparse_block_in_hours_and_keep_quiet_on_mid_shares(
    ch, clickhouse, local_store_resource, watchlist, webhook
) -> None:
    """The asset's defaults (edd 6: h = 2.1; an hour weighs up to 3 measurements) on
    OONI-like sparsity: a network measuring x.com once every other hour while blocked
    is detected on its 4th blocked measurement (hour 30, 4 x 0.65), where OONI's
    parameters need 6 measured hours (hour 34). Five measurements an hour with one
    anomaly (0.2) take 3 x 0.15 off an hour: ended on the 5th such hour. Ten networks
    alternating 0.25 / 0.45 in dense hours stay quiet; one alternating 0.05 / 0.95 is
    blocked on its second blocked hour and stays so."""
    five = dict.fromkeys(range(0, 80), 5)
    sparse = hours(0, 23, 1) | dict.fromkeys(range(24, 48, 2), 1) | hours(48, 79, 1)
    counts = five | dict.fromkeys(range(24, 48, 2), 1)
    insert_timeline(ch, "IR", 44244, "x.com", sparse, per_hour=counts)
    alternating = {h: (5 if h % 2 else 9) for h in range(24, 24 + 5 * 24)}
    for asn in range(1, 11):
        insert_timeline(ch, "PK", asn, "t.me", hours(0, 23, OK_LEVEL) | alternating)
    hard = {h: (BLOCKED_LEVEL if h % 2 else OK_LEVEL) for h in range(24, 24 + 5 * 24)}
    insert_timeline(ch, "PK", 99, "x.com", hours(0, 23, OK_LEVEL) | hard)
    assert detect(clickhouse, local_store_resource, 0, 143, config=SHIPPED).success
    assert summary(ch) == [
        ("blocking", "PK", "x.com", "ongoing", "change", 27, None, [99]),
        ("blocking", "IR", "x.com", "ended", "change", 30, 52, [44244]),
    ]
    for asn in range(1, 11):
        assert not [c for _, _, c in status_of(ch, "PK", asn, "t.me") if c]
    ch.command("TRUNCATE TABLE blocking_status")
    ch.command("TRUNCATE TABLE blocking_events")
    assert detect(clickhouse, local_store_resource, 0, 143).success  # OONI's parameters
    assert [(e["probe_cc"], e["start"]) for e in events(ch) if e["domain"] == "x.com"] == [
        ("IR", 34),
        ("PK", 45),
    ]


def test_gaps_of_6_and_72_hours(ch, clickhouse, local_store_resource, watchlist, webhook) -> None:
    """Three blocked hours, a silence, then blocked again: after 6 silent hours the
    memory is intact (the 3rd hour back crosses h); after 72 it has decayed to a
    third (the 5th hour back crosses). Other domains keep the countries' volume up."""
    before = hours(0, 23, OK_LEVEL) | hours(24, 26, BLOCKED_LEVEL)
    insert_timeline(ch, "EG", 1, "x.com", before | hours(33, 40, BLOCKED_LEVEL))
    insert_timeline(ch, "TR", 2, "x.com", before | hours(99, 110, BLOCKED_LEVEL))
    for cc in ("EG", "TR"):
        insert_timeline(ch, cc, 3, "filler.example", hours(0, 110, 0))
    assert detect(clickhouse, local_store_resource, 0, 110).success
    assert summary(ch) == [
        ("blocking", "EG", "x.com", "ongoing", "change", 35, None, [1]),
        ("blocking", "TR", "x.com", "ongoing", "change", 103, None, [2]),
    ]
    assert len(messages(webhook)) == 1  # TR's onset is recent, EG's is not


def test_national_block_over_50_networks_is_one_event(
    ch, clickhouse, local_store_resource, watchlist, webhook
) -> None:
    """50 networks blocked within three hours of each other, and recovering over a
    day: one event listing all 50; the same domain in another country: nothing."""
    for asn in range(1000, 1050):
        onset = 24 + asn % 3
        recovery = 60 + asn % 24
        levels = hours(0, onset - 1, OK_LEVEL) | hours(onset, recovery - 1, BLOCKED_LEVEL)
        insert_timeline(ch, "RU", asn, "x.com", levels | hours(recovery, 100, OK_LEVEL))
    insert_timeline(ch, "DE", 3320, "x.com", hours(0, 100, OK_LEVEL))
    assert detect(clickhouse, local_store_resource, 0, 100).success
    # First crossings at 24+5; the last network (recovering at 60+23) is OK on its
    # 12th ok hour, 94.
    assert summary(ch) == [
        ("blocking", "RU", "x.com", "ended", "change", 29, 94, list(range(1000, 1050)))
    ]
    assert events(ch)[0]["peak_networks"] == 50
    sent = messages(webhook)
    assert len(sent) == 1 and "blocking ended" in sent[0]
    assert ch.scalar("SELECT countIf(change = 1) FROM blocking_status") == 50


def test_shutdown_opens_a_no_measurements_event(
    ch, clickhouse, local_store_resource, watchlist, webhook
) -> None:
    """IR goes silent for 10 hours after two steady days while DE keeps measuring:
    one no_measurements event, ended when measurements resume. When every country
    is silent (data not uploaded yet), nothing."""
    insert_timeline(ch, "IR", 1, "x.com", hours(0, 47, OK_LEVEL) | hours(58, 71, OK_LEVEL))
    insert_timeline(ch, "DE", 2, "x.com", hours(0, 71, OK_LEVEL))
    store = local_store_resource.get_store()
    assert detect(clickhouse, local_store_resource, 0, 50).success
    assert summary(ch) == [("no_measurements", "IR", "", "ongoing", "change", 48, None, [])]
    assert "no measurements" in messages(webhook)[0]
    assert detect(clickhouse, local_store_resource, 51, 71).success
    assert summary(ch) == [("no_measurements", "IR", "", "ended", "change", 48, 58, [])]
    assert "measurements resumed" in messages(webhook)[1]
    entry = parse_feed(store, "feeds/blocking/IR.atom").entries[0]
    assert entry.title == "Measurements from IR resumed"
    assert "domain=" not in entry.link
    # Hours 72.. have no data at all anywhere: not a shutdown.
    assert detect(clickhouse, local_store_resource, 72, 90).success
    assert summary(ch) == [("no_measurements", "IR", "", "ended", "change", 48, 58, [])]
    assert len(messages(webhook)) == 2


def test_a_shutdown_is_found_by_hourly_passes_as_by_one_run(
    ch, clickhouse, local_store_resource, watchlist, webhook
) -> None:
    """The hourly schedule's way: one pass per hour. A silence is an event from its
    2nd hour, which a pass of one hour only sees by looking back over the hour
    before its own (it found nothing before: passes of one hour never did)."""
    insert_timeline(ch, "IR", 1, "x.com", hours(0, 47, OK_LEVEL) | hours(58, 71, OK_LEVEL))
    insert_timeline(ch, "DE", 2, "x.com", hours(0, 71, OK_LEVEL))
    instance = dg.DagsterInstance.ephemeral()
    assert detect(clickhouse, local_store_resource, 0, 46, instance).success
    for hour in range(47, 62):
        assert detect(clickhouse, local_store_resource, hour, hour, instance).success
        if hour == 49:
            assert summary(ch) == [("no_measurements", "IR", "", "ongoing", "change", 48, None, [])]
    assert summary(ch) == [("no_measurements", "IR", "", "ended", "change", 48, 58, [])]
    assert headlines(webhook) == ["no measurements", "measurements resumed"]


def test_a_backfill_over_history_in_chunks_announces_nothing(
    ch, clickhouse, local_store_resource, watchlist, webhook, monkeypatch
) -> None:
    """A backfill run today over last year, in chunks of 12 hours: each chunk's
    events are recent for its own last hour, but old news for today. Recorded as
    announced, no message; the events and feeds are as a live run leaves them."""
    levels = hours(0, 23, OK_LEVEL) | hours(24, 47, BLOCKED_LEVEL) | hours(48, 79, OK_LEVEL)
    insert_timeline(ch, "IR", 44244, "x.com", levels)
    insert_timeline(ch, "DE", 1, "x.com", hours(0, 79, OK_LEVEL))
    monkeypatch.setattr(announce, "current_hour", lambda: H0 + 24 * 365)
    instance = dg.DagsterInstance.ephemeral()
    for first in range(0, 80, 12):
        assert detect(clickhouse, local_store_resource, first, first + 11, instance).success
    assert summary(ch) == [("blocking", "IR", "x.com", "ended", "change", 29, 59, [44244])]
    assert events(ch)[0]["announced"] == "ended"
    assert messages(webhook) == []
    feed = parse_feed(local_store_resource.get_store(), "feeds/blocking/IR.atom")
    assert [e.title for e in feed.entries] == ["x.com reachable again in IR"]


def test_late_upload_corrects_the_event_without_duplicating_it(
    ch, clickhouse, local_store_resource, watchlist, webhook
) -> None:
    """Blocked from hour 24, detected at 29 and announced. Then measurements of
    hours 20..23 are re-uploaded (new versions, same uids) showing the block began
    at 20: re-detecting those hours moves the onset to 25 and carries on to hour
    40; the event keeps its id, is updated, and no second message is sent. Finally
    a re-upload showing no block at all withdraws it (one message)."""
    insert_timeline(ch, "IR", 7, "x.com", hours(0, 23, OK_LEVEL) | hours(24, 40, BLOCKED_LEVEL))
    insert_timeline(ch, "IR", 8, "filler.example", hours(0, 40, 0))
    store = local_store_resource.get_store()
    instance = dg.DagsterInstance.ephemeral()
    assert detect(clickhouse, local_store_resource, 0, 40, instance).success
    eid = event_id("blocking", "IR", "x.com", H0 + 29)
    assert [(e["event_id"], e["start"]) for e in events(ch)] == [(eid, 29)]
    assert len(messages(webhook)) == 1
    before = parse_feed(store, "feeds/blocking/IR.atom").entries[0].updated
    time.sleep(1.1)  # Atom's `updated` has whole seconds: the correction must show later

    insert_timeline(ch, "IR", 7, "x.com", hours(20, 23, BLOCKED_LEVEL))  # same uids
    result = detect(clickhouse, local_store_resource, 20, 23, instance)
    assert result.success
    assert summary(ch) == [("blocking", "IR", "x.com", "ongoing", "change", 25, None, [7])]
    assert [e["event_id"] for e in events(ch)] == [eid]
    assert ch.scalar("SELECT count() FROM blocking_events") >= 2  # updated: a newer version
    assert len(messages(webhook)) == 1
    entries = parse_feed(store, "feeds/blocking/IR.atom").entries
    assert [e.id for e in entries] == [f"tag:ooni.org,2024:blocking-event:{eid}"]
    assert entries[0].updated > before
    assert ch.scalar("SELECT count() FROM blocking_status FINAL") == 41 * 1
    status = result.asset_materializations_for_node("blocking_detector")[0].metadata
    assert status["hours_detected_from"].value == f"{at(20):%Y-%m-%d %H:%M:%S}"
    assert status["hours_detected_to"].value == f"{at(40):%Y-%m-%d %H:%M:%S}"

    insert_timeline(ch, "IR", 7, "x.com", hours(20, 40, OK_LEVEL))
    assert detect(clickhouse, local_store_resource, 20, 23, instance).success
    assert summary(ch) == [("blocking", "IR", "x.com", "withdrawn", "change", 25, None, [7])]
    assert "withdrawn" in messages(webhook)[1] and len(messages(webhook)) == 2
    assert parse_feed(store, "feeds/blocking/IR.atom").entries == []


def test_hostile_names_stay_text(
    ch, clickhouse, local_store_resource, watchlist, webhook, tmp_path, monkeypatch
) -> None:
    """A test list's domain with markup and controls, under a consumer's domain: valid
    Atom in the country's and the consumer's feeds, literal in the operator's and the
    consumer's chat; a malformed country code gets no series and no feed."""
    domain = "<b>&x</b>\x01`@here`.bbc.com"
    _citizenlab(ch, domain)
    hook = _watchlist_file(
        tmp_path,
        monkeypatch,
        "  bbc: {domains: [bbc.com], webhook_env: BBC_WEBHOOK_URL}\n",
        webhook,
    )
    insert_timeline(ch, "IR", 5, domain, hours(0, 23, OK_LEVEL) | hours(24, 40, BLOCKED_LEVEL))
    insert_timeline(ch, "../", 6, "x.com", hours(0, 40, BLOCKED_LEVEL))
    assert detect(clickhouse, local_store_resource, 0, 40).success
    assert [(e["probe_cc"], e["domain"]) for e in events(ch)] == [("IR", domain)]
    store = local_store_resource.get_store()
    for text in (messages(webhook)[0], messages(webhook, hook["bbc"])[0]):
        assert "<b>" not in text and "&lt;b&gt;" in text and "```" in text
        assert "\x01" not in text.split("```")[0]
    for key in ("feeds/blocking/IR.atom", "feeds/watchlists/bbc.atom"):
        feed = parse_feed(store, key)
        assert feed.entries[0].title.startswith("<b>&x</b>")
        assert "\x01" not in feed.entries[0].title
    assert store.list_keys("feeds/blocking/") == [
        "feeds/blocking/IR.atom",
        "feeds/blocking/global.atom",
    ]


def test_an_extra_domain_that_is_no_domain_fails_the_run_naming_it(
    ch, clickhouse, local_store_resource, watchlist, webhook
) -> None:
    """extra_domains are validated as the watchlist file's domains: a value with markup
    fails the run before anything is written, naming its place in the run config and
    showing an excerpt; a valid one is watched in every spelling (IDNA, Unicode)."""
    insert_timeline(ch, "IR", 7, "bücher.de", hours(0, 23, OK_LEVEL) | hours(24, 40, BLOCKED_LEVEL))
    bad = "<script>" + "x" * 200 + ".com"
    failed = detect(
        clickhouse, local_store_resource, 0, 40, config={"extra_domains": ["Bücher.de", bad]}
    )
    assert not failed.success
    text = failure_text(failed)
    assert "ops.blocking_detector.config.extra_domains[1]: '<script>xxx" in text
    assert "is not a domain name" in text and "x" * 100 not in text
    assert ch.scalar("SELECT count() FROM blocking_status") == 0
    assert local_store_resource.get_store().list_keys("feeds/") == []
    assert messages(webhook) == []

    result = detect(
        clickhouse, local_store_resource, 0, 40, config={"extra_domains": ["Bücher.de"]}
    )
    assert result.success
    assert summary(ch) == [("blocking", "IR", "bücher.de", "ongoing", "change", 29, None, [7])]


def _citizenlab(ch: ClickHouse, *domains: str) -> None:
    ch.insert_df(
        "citizenlab",
        pd.DataFrame(
            [
                {"domain": d, "url": f"https://{d}/", "cc": "ZZ", "category_code": "GRP"}
                for d in domains
            ]
        ),
    )


def _watchlist_file(tmp_path, monkeypatch, consumers: str, *servers) -> dict[str, str]:
    """Writes the watchlist file (``consumers``: its lines under ``consumers:``) and sets
    each consumer's webhook variable, ``<NAME>_WEBHOOK_URL``, to a path of the first
    server (or of the server given for it): consumer -> its path."""
    path = tmp_path / "watchlists.yaml"
    path.write_text("consumers:\n" + consumers, encoding="utf-8")
    monkeypatch.setenv("OONI_WATCHLISTS", str(path))
    paths = {}
    for i, name in enumerate(("bbc", "dw", "rsf")):
        server = servers[min(i, len(servers) - 1)]
        paths[name] = f"/{name}-hook"
        monkeypatch.setenv(f"{name.upper()}_WEBHOOK_URL", server.url(paths[name]))
    return paths


def test_each_consumer_gets_its_events_in_its_feed_and_at_its_webhook(
    ch, clickhouse, local_store_resource, watchlist, webhook, tmp_path, monkeypatch
) -> None:
    """Consumers of the watchlist file: their domains are watched (bbc.com, a Unicode
    spelling of rsf's bücher.de), and each gets the events of its domains and their
    subdomains (news.bbc.com, from the test list), never of lookalikes (notbbc.com),
    starts and ends, in its feed, and at its webhook if it names one (dw: feed only)."""
    _citizenlab(ch, "news.bbc.com", "notbbc.com")
    hook = _watchlist_file(
        tmp_path,
        monkeypatch,
        "  bbc:\n    domains: [BBC.com]\n    webhook_env: BBC_WEBHOOK_URL\n"
        "  dw: [dw.com]\n"
        "  rsf: {domains: [xn--bcher-kva.de], webhook_env: RSF_WEBHOOK_URL}\n",
        webhook,
    )
    blocked = hours(0, 23, OK_LEVEL) | hours(24, 47, BLOCKED_LEVEL) | hours(48, 79, OK_LEVEL)
    for asn, domain in enumerate(("x.com", "bbc.com", "news.bbc.com", "notbbc.com", "bücher.de")):
        insert_timeline(ch, "IR", 100 + asn, domain, blocked)
    insert_timeline(ch, "IR", 200, "dw.com", hours(0, 79, OK_LEVEL))
    instance = dg.DagsterInstance.ephemeral()
    store = local_store_resource.get_store()

    result = detect(clickhouse, local_store_resource, 0, 35, instance)
    assert result.success
    assert {e["domain"] for e in events(ch)} == {
        "x.com",
        "bbc.com",
        "news.bbc.com",
        "notbbc.com",
        "bücher.de",
    }
    assert len(messages(webhook)) == 5  # the operator: every event

    def told(consumer: str) -> list[str]:
        return sorted(
            m.split("```")[1].strip().split(".")[0] for m in messages(webhook, hook[consumer])
        )

    assert told("bbc") == ["bbc", "news"]  # "bbc.com blocked in IR", "news.bbc.com ..."
    assert all("blocking started" in m for m in messages(webhook, hook["bbc"]))
    assert [m.split("```")[1].strip().split(" ")[0] for m in messages(webhook, hook["rsf"])] == [
        "bücher.de"
    ]
    assert messages(webhook, hook["dw"]) == []
    bbc_ids = {event_id("blocking", "IR", d, H0 + 29) for d in ("bbc.com", "news.bbc.com")}
    feed = parse_feed(store, "feeds/watchlists/bbc.atom")
    assert {e.id.rsplit(":", 1)[-1] for e in feed.entries} == bbc_ids
    assert feed.feed.id == "tag:ooni.org,2024:feeds/watchlists/bbc"
    assert parse_feed(store, "feeds/watchlists/dw.atom").entries == []
    metadata = [
        m.metadata
        for m in result.asset_materializations_for_node("blocking_detector")
        if m.asset_key == dg.AssetKey("blocking_events")
    ][-1]  # one per hour, the same
    assert metadata["consumer_messages_posted"].value == {"bbc": 2, "rsf": 1}
    assert "feeds/watchlists/dw.atom" in metadata["feeds_written"].value
    assert webhook.base_url not in json.dumps({k: str(v) for k, v in metadata.items()})

    assert detect(clickhouse, local_store_resource, 36, 79, instance).success
    ended = messages(webhook, hook["bbc"])[2:]
    assert len(ended) == 2 and all("blocking ended" in m for m in ended)
    assert len(messages(webhook, hook["rsf"])) == 2 and len(messages(webhook)) == 10
    # The end is an entry of its own: a reader showing only new entries learns it.
    entries = parse_feed(store, "feeds/watchlists/bbc.atom").entries
    assert sorted(e.id.split("blocking-event:")[1] for e in entries) == sorted(
        [*bbc_ids, *(f"{i}:ended" for i in bbc_ids)]
    )
    titles = {e.title for e in entries}
    assert titles == {
        "bbc.com blocked in IR",
        "news.bbc.com blocked in IR",
        "bbc.com reachable again in IR",
        "news.bbc.com reachable again in IR",
    }
    assert entries[0].title.endswith("reachable again in IR")  # the latest first

    # A rerun of hours already detected sends nothing to anyone.
    assert detect(clickhouse, local_store_resource, 50, 52, instance).success
    assert len(webhook.posts) == 10 + 4 + 2


def test_a_failing_consumer_webhook_blocks_no_one_and_is_sent_again(
    ch, clickhouse, local_store_resource, watchlist, webhook, tmp_path, monkeypatch
) -> None:
    """dw's webhook fails and rsf's variable holds no URL: the operator and bbc get
    their message once, dw's feed is written, the run fails naming dw's and rsf's
    variables (never their values); cpj's variable is not set yet, so its message
    waits. The next run sends dw, rsf and cpj their message and nothing again to the
    others."""
    from ooni_pipeline_tests.rig import UpstreamServer

    down = UpstreamServer()
    try:
        hook = _watchlist_file(
            tmp_path,
            monkeypatch,
            # dw first: its failure must not keep bbc's message back
            "  dw: {domains: [x.com], webhook_env: DW_WEBHOOK_URL}\n"
            "  bbc: {domains: [x.com], webhook_env: BBC_WEBHOOK_URL}\n"
            "  rsf: {domains: [x.com], webhook_env: RSF_WEBHOOK_URL}\n"
            "  cpj: {domains: [x.com], webhook_env: CPJ_WEBHOOK_URL}\n",
            webhook,
            down,
        )
        monkeypatch.setenv("RSF_WEBHOOK_URL", "xoxb-secret-token")  # no URL
        monkeypatch.delenv("CPJ_WEBHOOK_URL", raising=False)  # not set yet: cpj's wait
        down.post_status = 500
        insert_timeline(ch, "IR", 7, "x.com", hours(0, 23, OK_LEVEL) | hours(24, 40, BLOCKED_LEVEL))
        failed = detect(clickhouse, local_store_resource, 0, 40)
        assert not failed.success
        text = failure_text(failed)
        assert "consumer dw" in text and "DW_WEBHOOK_URL" in text and "HTTP 500" in text
        assert down.base_url not in text and "dw-hook" not in text
        assert "consumer rsf" in text and "RSF_WEBHOOK_URL is not an http(s) URL" in text
        assert "xoxb" not in text
        assert len(messages(webhook)) == 1 and len(messages(webhook, hook["bbc"])) == 1
        assert len(messages(down, hook["dw"])) == 1  # the failed POST
        store = local_store_resource.get_store()
        assert len(parse_feed(store, "feeds/watchlists/dw.atom").entries) == 1

        down.post_status = 200
        monkeypatch.setenv("RSF_WEBHOOK_URL", down.url(hook["rsf"]))
        monkeypatch.setenv("CPJ_WEBHOOK_URL", down.url("/cpj-hook"))
        assert detect(clickhouse, local_store_resource, 40, 40).success
        assert len(messages(down, hook["dw"])) == 2 and len(messages(down, hook["rsf"])) == 1
        assert len(messages(down, "/cpj-hook")) == 1
        assert len(messages(webhook)) == 1 and len(messages(webhook, hook["bbc"])) == 1
        assert detect(clickhouse, local_store_resource, 40, 40).success
        assert len(down.posts) == 4 and len(webhook.posts) == 2
    finally:
        down.close()


def test_webhook_failure_fails_the_run_and_is_sent_again(
    ch, clickhouse, local_store_resource, watchlist, webhook
) -> None:
    insert_timeline(ch, "IR", 7, "x.com", hours(0, 23, OK_LEVEL) | hours(24, 40, BLOCKED_LEVEL))
    webhook.post_status = 500
    result = detect(clickhouse, local_store_resource, 0, 40)
    assert not result.success
    assert "HTTP 500" in failure_text(result) and "/hook" not in failure_text(result)
    assert events(ch)[0]["announced"] == ""
    webhook.post_status = 200
    assert detect(clickhouse, local_store_resource, 40, 40).success
    assert events(ch)[0]["announced"] == "ongoing"
    assert len(messages(webhook)) == 2  # the failed POST, then the one that went through


def test_a_changed_fastpath_day_requests_its_hours_and_citizenlab_requests_none() -> None:
    from dagster._core.definitions.data_version import DATA_VERSION_TAG

    from ooni_pipeline.clickhouse import ClickHouseResource
    from ooni_pipeline.fastpath.assets import build_fastpath_asset
    from ooni_pipeline.object_store import ObjectStoreResource

    defs = dg.Definitions(
        assets=[build_fastpath_asset("external"), dg.AssetSpec("citizenlab"), blocking_detector],
        resources={"clickhouse": ClickHouseResource(), "object_store": ObjectStoreResource()},
    )
    instance = dg.DagsterInstance.ephemeral()
    start = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert start.total_requested == 0
    instance.report_runless_asset_event(
        dg.AssetObservation(
            "fastpath", partition="2024-03-01", tags={DATA_VERSION_TAG: "40@2024-03-05"}
        )
    )
    changed = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=start.cursor)
    requested = changed.get_requested_partitions(dg.AssetKey("blocking_status"))
    assert requested == {f"2024-03-01-{h:02d}:00" for h in range(24)}
    instance.report_runless_asset_event(dg.AssetMaterialization("citizenlab"))
    later = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=changed.cursor)
    assert later.get_requested_partitions(dg.AssetKey("blocking_status")) == set()


def _status_rows(ch: ClickHouse) -> list[tuple]:
    """Every stored row of ``blocking_status``, every version (no FINAL)."""
    return ch.query_rows(
        "SELECT * FROM blocking_status ORDER BY hour, probe_cc, probe_asn, domain, update_time"
    )


def test_a_failed_redetection_leaves_the_status_table_as_it_was(
    ch, clickhouse, local_store_resource, watchlist, webhook, monkeypatch
) -> None:
    """A late upload re-detects hours 716..760, across the March/April boundary
    (hour 744), a day at a time. The second day failing must leave every row as it
    was; the rerun then replaces both months, keeps the hours before the range, and
    leaves no older version behind in the range."""
    from ooni_pipeline.detector import status as status_module

    insert_timeline(
        ch, "IR", 7, "x.com", hours(700, 723, OK_LEVEL) | hours(724, 760, BLOCKED_LEVEL)
    )
    insert_timeline(ch, "IR", 8, "filler.example", hours(700, 760, 0))
    instance = dg.DagsterInstance.ephemeral()
    assert detect(clickhouse, local_store_resource, 700, 760, instance).success
    assert summary(ch)[0][5] == 729
    before = _status_rows(ch)
    assert len(before) == 61 * 1

    insert_timeline(ch, "IR", 7, "x.com", hours(716, 723, BLOCKED_LEVEL))  # same uids
    real = status_module._observations
    calls = []

    def failing_on_the_second_day(*args):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("memory limit exceeded (injected)")
        return real(*args)

    monkeypatch.setattr(status_module, "_observations", failing_on_the_second_day)
    failed = detect(clickhouse, local_store_resource, 716, 723, instance)
    assert not failed.success and "injected" in failure_text(failed)
    assert len(calls) == 2
    assert _status_rows(ch) == before
    assert summary(ch)[0][5] == 729

    monkeypatch.setattr(status_module, "_observations", real)
    assert detect(clickhouse, local_store_resource, 716, 723, instance).success
    after = _status_rows(ch)
    assert after[:16] == before[:16]  # hours 700..715: the very same rows
    assert [row[0] for row in after] == [row[0] for row in before]  # one row per hour
    assert all(new[-1] > old[-1] for new, old in zip(after[16:], before[16:], strict=True))
    assert summary(ch)[0][5] == 721


def _refuse_the_second_swap(monkeypatch) -> None:
    """The engine refuses a pass's second REPLACE PARTITION statement (a Keeper
    timeout on a replicated table fails one statement like that), until undone."""
    command = ClickHouse.command
    swaps: list[str] = []

    def refusing_the_second_swap(self, sql, *args, **kwargs):
        if "REPLACE PARTITION" in sql:
            swaps.append(sql)
            if len(swaps) == 2:
                raise ClickHouseError("Code: 999. DB::Exception: Keeper timeout (injected)")
        return command(self, sql, *args, **kwargs)

    monkeypatch.setattr(ClickHouse, "command", refusing_the_second_swap)


def test_a_pass_failing_after_its_swap_has_its_events_found_by_the_next(
    ch, clickhouse, local_store_resource, watchlist, webhook, monkeypatch
) -> None:
    """Hour by hour, the pass of hour 29 (the onset's crossing) swaps its status in
    and then fails writing its events. The next pass regroups from hour 29, not
    from its own hour 30: the event starts at 29 with onset `change` and is
    announced once, as without the failure (regrouped from 30 it would have been an
    unannounced `initial` event starting at 30)."""
    levels = hours(0, 23, OK_LEVEL) | hours(24, 40, BLOCKED_LEVEL)
    insert_timeline(ch, "IR", 44244, "x.com", levels)
    insert_timeline(ch, "DE", 1, "x.com", hours(0, 40, OK_LEVEL))
    instance = dg.DagsterInstance.ephemeral()
    assert detect(clickhouse, local_store_resource, 0, 28, instance).success
    insert = ClickHouse.insert_df

    def refusing_events(self, table, *args, **kwargs):
        if table == "blocking_events":
            raise ClickHouseError("Code: 999. DB::Exception: Keeper timeout (injected)")
        return insert(self, table, *args, **kwargs)

    monkeypatch.setattr(ClickHouse, "insert_df", refusing_events)
    failed = detect(clickhouse, local_store_resource, 29, 29, instance)
    monkeypatch.setattr(ClickHouse, "insert_df", insert)
    assert not failed.success and "Keeper timeout (injected)" in failure_text(failed)
    assert [c for h, _, c in status_of(ch, "IR", 44244, "x.com") if h == 29] == [1]
    assert summary(ch) == []
    for hour in (30, 31):
        assert detect(clickhouse, local_store_resource, hour, hour, instance).success
    assert summary(ch) == [("blocking", "IR", "x.com", "ongoing", "change", 29, None, [44244])]
    assert headlines(webhook) == ["blocking started"]
    assert ch.scalar("SELECT count() FROM blocking_status_redo") == 0


def test_a_swap_failing_on_its_second_day_leaves_a_prefix_the_next_pass_completes(
    ch, clickhouse, local_store_resource, watchlist, webhook, monkeypatch
) -> None:
    """The late upload of the test above re-detects hours 716..760 (three days). The
    engine refusing the swap of the second day (a Keeper timeout on a replicated
    table does that to one statement) leaves a prefix: the hours before the range as
    they were, the first day's new hours, nothing after; never new hours beside old
    ones. The next pass computes the rest, and the result is the uninterrupted one."""
    insert_timeline(
        ch, "IR", 7, "x.com", hours(700, 723, OK_LEVEL) | hours(724, 760, BLOCKED_LEVEL)
    )
    insert_timeline(ch, "IR", 8, "filler.example", hours(700, 760, 0))
    instance = dg.DagsterInstance.ephemeral()
    assert detect(clickhouse, local_store_resource, 700, 760, instance).success
    before = _status_rows(ch)
    insert_timeline(ch, "IR", 7, "x.com", hours(716, 723, BLOCKED_LEVEL))

    _refuse_the_second_swap(monkeypatch)
    failed = detect(clickhouse, local_store_resource, 716, 723, instance)
    monkeypatch.undo()
    assert not failed.success and "Keeper timeout (injected)" in failure_text(failed)
    prefix = _status_rows(ch)
    first_day_end = 719  # hour 720 is 2024-03-31 00:00
    assert at(first_day_end + 1).hour == 0
    assert [row[0] for row in prefix] == [at(h) for h in range(700, first_day_end + 1)]
    assert prefix[:16] == before[:16]  # before the range: the very same rows
    assert all(new[-1] > old[-1] for new, old in zip(prefix[16:], before[16:20], strict=True))

    assert detect(clickhouse, local_store_resource, 761, 761, instance).success  # the next hour
    after = _status_rows(ch)
    assert [row[0] for row in after] == [at(h) for h in range(700, 762)]
    assert summary(ch)[0][5] == 721  # as the uninterrupted re-detection (test above)


def test_a_long_redetection_failing_mid_swap_is_computed_again_by_the_next_pass(
    ch, clickhouse, local_store_resource, watchlist, webhook, monkeypatch
) -> None:
    """A late upload re-detects 16 days (716..1100), more than the detector looks back
    for unprocessed hours (forget_after_hours, 240): the swap failing on its second
    day leaves a prefix ending on the first day, and the range in
    blocking_status_redo, so the next hourly pass computes every missing hour again
    and clears it. (Found by review: without the record, 382 hours stayed missing.)"""
    last = 1100
    insert_timeline(ch, "IR", 7, "x.com", hours(700, last, OK_LEVEL))
    instance = dg.DagsterInstance.ephemeral()
    assert detect(clickhouse, local_store_resource, 700, last, instance).success

    def stored() -> list[datetime]:
        return [
            r[0] for r in ch.query_rows("SELECT DISTINCT hour FROM blocking_status ORDER BY hour")
        ]

    assert stored() == [at(h) for h in range(700, last + 1)]
    insert_timeline(ch, "IR", 7, "x.com", hours(716, 723, BLOCKED_LEVEL), tag="late")

    _refuse_the_second_swap(monkeypatch)
    assert not detect(clickhouse, local_store_resource, 716, 723, instance).success
    monkeypatch.undo()
    assert stored()[-1] == at(719)
    assert ch.scalar("SELECT count() FROM blocking_status_redo") == 1
    assert detect(clickhouse, local_store_resource, last + 1, last + 1, instance).success
    assert stored() == [at(h) for h in range(700, last + 2)]
    assert ch.scalar("SELECT count() FROM blocking_status_redo") == 0


# -- exactly once, whatever the chunking --------------------------------------------

HORIZON = 48  # hours 0..47 of each generated timeline


def generated_timeline(seed: int) -> dict[tuple[str, int, str], dict[int, int]]:
    """Series (country, network, domain) -> hour -> anomalies: overlapping events in
    one country and across countries, blocks from the first hour (``initial``),
    blocks that end inside the horizon and ones still on at its end, quiet series.
    Offsets and lengths are drawn from ``seed``; every block lasts long enough to be
    detected (6 blocked hours) and every recovery to be seen (12 ok hours)."""
    rng = np.random.default_rng(seed)
    series: dict[tuple[str, int, str], dict[int, int]] = {}
    for cc, asns in (("IR", (1, 2, 3)), ("RU", (4, 5))):
        for asn in asns:
            for domain in ("x.com", "t.me"):
                shape = rng.choice(["ok", "episode", "initial", "ongoing", "ok"])
                if shape == "ok":
                    series[(cc, asn, domain)] = hours(0, HORIZON - 1, OK_LEVEL)
                elif shape == "initial":  # blocked from the start, recovers
                    stop = int(rng.integers(8, 20))
                    series[(cc, asn, domain)] = hours(0, stop, BLOCKED_LEVEL) | hours(
                        stop + 1, HORIZON - 1, OK_LEVEL
                    )
                else:
                    start = int(rng.integers(12, 22))
                    stop = HORIZON - 1 if shape == "ongoing" else start + int(rng.integers(7, 12))
                    series[(cc, asn, domain)] = (
                        hours(0, start - 1, OK_LEVEL)
                        | hours(start, stop, BLOCKED_LEVEL)
                        | hours(stop + 1, HORIZON - 1, OK_LEVEL)
                    )
    # A country with steady volume keeps the detector's view of coverage stable.
    series[("IT", 9, "filler.example")] = hours(0, HORIZON - 1, 0)
    return series


def _fresh_detector(ch: ClickHouse) -> None:
    for table in ("blocking_status", "blocking_events", "blocking_status_redo"):
        ch.command(f"DROP TABLE IF EXISTS {table} SYNC")


def _outcome(ch: ClickHouse, server) -> tuple[list[tuple], dict[str, list[str]]]:
    """The final events (with ids), and each event's messages in the order sent
    (keyed by the event's domain, country and start as its message names them)."""
    rows = [(e["event_id"], *row) for e, row in zip(events(ch), summary(ch), strict=True)]
    sent: dict[str, list[str]] = {}
    for text in messages(server):
        kind = text.split("\n", 1)[0].rsplit(": ", 1)[1]
        where = re.search(r"```\n(.*?)\.\nSince ([0-9: -]+ UTC)", text)
        assert where, text
        sent.setdefault(f"{where[1]} since {where[2]}", []).append(kind)
    server.posts.clear()
    return rows, sent


@pytest.mark.clickhouse_backends("embedded")
@pytest.mark.parametrize("seed", [3, 11])
def test_every_event_and_message_exactly_once_whatever_the_chunking(
    ch, clickhouse, local_store_resource, watchlist, webhook, seed
) -> None:
    """The same timeline detected in one run, in 12-hour chunks, hour by hour (after a
    first day), and with part of its rows uploaded late and their day re-detected in
    between: the same final events (ids, starts, ends, networks, status); each event's
    messages at most once each, a start before its end, and, all news being within
    the announcement window, exactly the one-run set of messages."""
    timeline = generated_timeline(seed)
    late = {key: levels for key, levels in timeline.items() if key[1] in (2, 5)}
    for (cc, asn, domain), levels in timeline.items():
        insert_timeline(ch, cc, asn, domain, levels)

    def run(chunks: list[tuple[int, int]]) -> tuple[list[tuple], dict[str, list[str]]]:
        _fresh_detector(ch)
        instance = dg.DagsterInstance.ephemeral()
        for first, last in chunks:
            assert detect(clickhouse, local_store_resource, first, last, instance).success
        # Every version of an event keeps its first_detected; updated moves only with
        # the event's content (the messages' bookkeeping rewrites neither).
        assert (
            ch.query_rows(
                "SELECT event_id FROM blocking_events GROUP BY event_id "
                "HAVING uniqExact(first_detected) > 1"
            )
            == []
        )
        assert (
            ch.query_rows(
                "SELECT event_id FROM blocking_events GROUP BY event_id, status, onset, "
                "start_hour, end_hour, networks, peak_networks HAVING uniqExact(updated) > 1"
            )
            == []
        )
        return _outcome(ch, webhook)

    one_rows, one_sent = run([(0, HORIZON - 1)])
    assert one_rows, "the timeline has events"
    for sent in one_sent.values():
        assert sent in (
            ["blocking started"],
            ["blocking ended"],
            ["blocking started", "blocking ended"],
        )
    twelve = run([(h, h + 11) for h in range(0, HORIZON, 12)])
    hourly = run([(0, 23), *((h, h) for h in range(24, HORIZON))])
    for rows, sent in (twelve, hourly):
        assert rows == one_rows
        assert sent == one_sent

    # Late rows: networks 2 and 5 upload hours 20..35 only after hour 40 was detected;
    # their day is re-detected as the automation does, then detection carries on.
    ch.command(
        "ALTER TABLE fastpath DELETE WHERE probe_asn IN (2, 5) AND "
        "measurement_start_time >= {a:DateTime} AND measurement_start_time < {b:DateTime}",
        {"a": at(20), "b": at(36)},
    )
    _fresh_detector(ch)
    instance = dg.DagsterInstance.ephemeral()
    for first in range(0, 41, 8):
        assert detect(clickhouse, local_store_resource, first, min(first + 7, 40), instance).success
    for (cc, asn, domain), levels in late.items():
        insert_timeline(ch, cc, asn, domain, {h: n for h, n in levels.items() if 20 <= h <= 35})
    assert detect(clickhouse, local_store_resource, 0, 23, instance).success  # the day 0..23
    assert detect(clickhouse, local_store_resource, 41, HORIZON - 1, instance).success
    late_rows, late_sent = _outcome(ch, webhook)
    assert [row[1:] for row in late_rows if row[4] != "withdrawn"] == [row[1:] for row in one_rows]
    for sent in late_sent.values():
        assert len(sent) == len(set(sent)), sent  # each news once
        assert sent[0] != "blocking ended" or "blocking started" not in sent, sent


@pytest.mark.clickhouse_backends("embedded")
def test_late_rows_showing_an_initial_events_onset_announce_its_start(
    ch, clickhouse, local_store_resource, watchlist, webhook
) -> None:
    """A network first measured already blocked: an ``initial`` event, no news. Its ok
    hours before, uploaded late, show the onset after all (``change``): its start is
    news then, as one run over all the rows announces it."""
    insert_timeline(ch, "IT", 9, "filler.example", hours(0, 60, 0))
    timeline = hours(0, 19, OK_LEVEL) | hours(20, 35, BLOCKED_LEVEL) | hours(36, 60, OK_LEVEL)
    insert_timeline(ch, "IR", 1, "x.com", timeline)
    assert detect(clickhouse, local_store_resource, 0, 60).success
    one = summary(ch), headlines(webhook)
    assert one[1] == ["blocking started", "blocking ended"]
    webhook.posts.clear()
    _fresh_detector(ch)
    ch.command(
        "ALTER TABLE fastpath DELETE WHERE probe_cc = 'IR' AND measurement_start_time < {t:DateTime}",
        {"t": at(20)},
    )
    assert detect(clickhouse, local_store_resource, 0, 30).success
    assert [(e["onset"], e["announced"]) for e in events(ch)] == [("initial", "")]
    insert_timeline(ch, "IR", 1, "x.com", hours(0, 19, OK_LEVEL))
    assert detect(clickhouse, local_store_resource, 0, 23).success  # the sensor's day
    assert detect(clickhouse, local_store_resource, 31, 60).success
    late = summary(ch), headlines(webhook)
    assert late == one


@pytest.mark.clickhouse_backends("embedded")
def test_a_chunk_starting_where_an_event_ended_keeps_it_and_opens_the_next(
    ch, clickhouse, local_store_resource, watchlist, webhook
) -> None:
    """12-hour chunks, one of them starting at the hour an event ended, with the
    domain blocked again later in that chunk: two events, as one run finds them (the
    second once took the first's id and erased it)."""
    insert_timeline(ch, "IT", 9, "filler.example", hours(0, 119, 0))
    timeline = (
        hours(0, 19, OK_LEVEL)
        | hours(20, 36, BLOCKED_LEVEL)
        | hours(37, 50, OK_LEVEL)
        | hours(51, 70, BLOCKED_LEVEL)
        | hours(71, 119, OK_LEVEL)
    )
    insert_timeline(ch, "IR", 1, "x.com", timeline)
    assert detect(clickhouse, local_store_resource, 0, 119).success
    one = [(e["event_id"], *row) for e, row in zip(events(ch), summary(ch), strict=True)]
    assert len(one) == 2 and one[0][7] == 48  # the first ends at 48: a chunk starts there
    webhook.posts.clear()
    _fresh_detector(ch)
    for first in range(0, 120, 12):
        assert detect(clickhouse, local_store_resource, first, first + 11).success
    chunked = [(e["event_id"], *row) for e, row in zip(events(ch), summary(ch), strict=True)]
    assert chunked == one
    # Each chunk's news is recent to it (the known gap of chunked backfills: one run
    # over 120 hours finds the first event's news older than 48 hours), each once.
    sent = headlines(webhook)
    assert sent == ["blocking started", "blocking ended"] * 2


def test_cusum_crossing_at_h_does_not_depend_on_how_hours_group_measurements() -> None:
    """Shipped defaults: six unblocked measurements take 6 x 0.35 = h off a block:
    not past h, whichever hours they came in (float sums of the groupings differ in
    the last bit; found by the review of 07e2855); a seventh ends it."""
    params = CusumParams()
    for weights in ([1] * 6, [3, 1, 1, 1], [2, 2, 1, 1], [3, 3], [1, 1, 1, 3], [2, 2, 2]):
        mem = SeriesState.empty(1)
        mem.state[:] = BLOCKED
        for hour, w in enumerate(weights):
            step(mem, hour, np.arange(1), np.zeros(1), np.array([w]), params)
        assert mem.state[0] == BLOCKED, weights
        step(mem, len(weights), np.arange(1), np.zeros(1), np.ones(1), params)
        assert mem.state[0] == OK, weights


IR_LEVELS = hours(0, 47, OK_LEVEL) | hours(58, 71, OK_LEVEL)  # IR silent 48..57


@pytest.mark.clickhouse_backends("embedded")
def test_hourly_passes_find_a_shutdown_while_their_own_hour_is_still_thin(
    ch, clickhouse, local_store_resource, watchlist, webhook
) -> None:
    """Live: the schedule detects hour H at H+1:20, when part of H is uploaded (a
    quarter here: under coverage_share, so H is "no evidence"); the rest arrives
    after. IR goes silent from 48 to 57 while DE measures on: hourly passes find the
    shutdown as one run over the same rows does. (Found by the review of 07e2855:
    pass 49 saw one covered silent hour, 48, and pass 50 looked back to 49 only.)"""
    insert_timeline(ch, "IR", 1, "x.com", {h: n for h, n in IR_LEVELS.items() if h < 47})
    insert_timeline(ch, "DE", 2, "x.com", hours(0, 46, OK_LEVEL))
    instance = dg.DagsterInstance.ephemeral()
    assert detect(clickhouse, local_store_resource, 0, 46, instance).success
    for hour in range(47, 72):
        early = {hour: 0}
        if hour in IR_LEVELS:
            insert_timeline(ch, "IR", 1, "x.com", early, tag="early", per_hour={hour: 5})
        insert_timeline(ch, "DE", 2, "x.com", early, tag="early", per_hour={hour: 5})
        assert detect(clickhouse, local_store_resource, hour, hour, instance).success
        rest = {hour: OK_LEVEL}
        if hour in IR_LEVELS:
            insert_timeline(ch, "IR", 1, "x.com", rest, tag="late", per_hour={hour: 15})
        insert_timeline(ch, "DE", 2, "x.com", rest, tag="late", per_hour={hour: 15})
    hourly = summary(ch), headlines(webhook)
    webhook.posts.clear()
    _fresh_detector(ch)
    assert detect(clickhouse, local_store_resource, 0, 71).success
    one = summary(ch), headlines(webhook)
    assert one == (
        [("no_measurements", "IR", "", "ended", "change", 48, 58, [])],
        ["no measurements", "measurements resumed"],
    )
    assert hourly == one


@pytest.mark.clickhouse_backends("embedded")
@pytest.mark.parametrize("gap", [30, 49])
def test_an_hour_without_any_upload_hides_no_shutdown_from_hourly_passes(
    ch, clickhouse, local_store_resource, watchlist, webhook, gap
) -> None:
    """All rows present before any pass (no latency at all). One hour in which no
    country uploaded anything (fastpath ingestion hiccup: "no evidence"), either in
    the 24 hours before IR's silence (30: the baseline window of an hourly pass then
    holds 23 covered hours, not 24) or right after its first hour (49: the 2nd silent
    hour is not covered). Hourly passes find the shutdown at 48 as one run does."""
    insert_timeline(ch, "IR", 1, "x.com", {h: n for h, n in IR_LEVELS.items() if h != gap})
    insert_timeline(
        ch, "DE", 2, "x.com", {h: n for h, n in hours(0, 71, OK_LEVEL).items() if h != gap}
    )
    assert detect(clickhouse, local_store_resource, 0, 71).success
    one = summary(ch), headlines(webhook)
    assert one == (
        [("no_measurements", "IR", "", "ended", "change", 48, 58, [])],
        ["no measurements", "measurements resumed"],
    )
    webhook.posts.clear()
    _fresh_detector(ch)
    instance = dg.DagsterInstance.ephemeral()
    assert detect(clickhouse, local_store_resource, 0, 46, instance).success
    for hour in range(47, 72):
        assert detect(clickhouse, local_store_resource, hour, hour, instance).success
    assert (summary(ch), headlines(webhook)) == one


@pytest.mark.clickhouse_backends("embedded")
@pytest.mark.parametrize("seed", [3, 11])
def test_the_chunking_property_holds_for_the_shipped_defaults_on_sparse_hours(
    ch, clickhouse, local_store_resource, watchlist, webhook, seed
) -> None:
    """The generated timelines thinned to OONI-like sparsity (0 to 3 measurements a
    series-hour, all blocked in a blocked hour, none in an ok one), so the shipped
    weights are below their cap: one run, 12-hour chunks and hourly passes agree."""
    rng = np.random.default_rng(seed + 100)
    for (cc, asn, domain), levels in generated_timeline(seed).items():
        counts = {h: int(rng.integers(0, 4)) for h in levels}
        if domain == "filler.example":
            counts = dict.fromkeys(levels, 20)
        kept = {h: (counts[h] if n >= BLOCKED_LEVEL else 0) for h, n in levels.items() if counts[h]}
        insert_timeline(ch, cc, asn, domain, kept, per_hour=counts)

    def run(chunks):
        _fresh_detector(ch)
        instance = dg.DagsterInstance.ephemeral()
        for first, last in chunks:
            assert detect(
                clickhouse, local_store_resource, first, last, instance, config=SHIPPED
            ).success
        return _outcome(ch, webhook)

    one_rows, one_sent = run([(0, HORIZON - 1)])
    assert one_rows
    twelve = run([(h, h + 11) for h in range(0, HORIZON, 12)])
    hourly = run([(0, 23), *((h, h) for h in range(24, HORIZON))])
    for name, (rows, sent) in (("twelve", twelve), ("hourly", hourly)):
        assert rows == one_rows, name
        assert sent == one_sent, name
