"""One detector pass, outside Dagster: status over the hours, events grouped and
reconciled, messages sent (to the operator and to the watchlist file's consumers),
feeds written. The asset and the benchmark both call
``detect``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd

from ooni_pipeline import settings
from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline.detector import sql
from ooni_pipeline.detector.announce import pending
from ooni_pipeline.detector.consumers import (
    announce_to_consumers,
    events_by_consumer,
    write_watchlist_feeds,
)
from ooni_pipeline.detector.cusum import CusumParams
from ooni_pipeline.detector.events import (
    EventParams,
    blocking_episodes,
    reconcile,
    shutdown_episodes,
)
from ooni_pipeline.detector.feeds import COUNTRY_CODE, build_feed, feed_key
from ooni_pipeline.detector.status import (
    StatusRun,
    events_written,
    hour_text,
    query_frame,
    run_status,
)
from ooni_pipeline.exports.watchlist_file import Consumer
from ooni_pipeline.object_store.stores import ObjectStore
from ooni_pipeline.operations.alerts import post_alert


@dataclass
class Detection:
    status: StatusRun
    written: pd.DataFrame  # event rows written (new, changed, withdrawn)
    events: pd.DataFrame  # every stored event after the pass
    messages_posted: int
    feeds: list[str]
    consumer_messages: dict[str, int] = field(default_factory=dict)


def detect(
    ch: ClickHouse,
    store: ObjectStore,
    first: int,
    last: int,
    domains: list[str],
    cusum: CusumParams,
    params: EventParams,
    version: datetime,
    log: Callable[[str], None] = print,
    consumers: dict[str, Consumer] | None = None,
) -> Detection:
    """Detect over [first, last] (extended as ``status`` explains), then events,
    messages and feeds. Tables must exist.

    Each webhook is tried whatever became of the others, and the feeds are written;
    then a failure to post fails the run, naming every webhook that failed (the next
    run sends what is left)."""
    consumers = consumers or {}
    status = run_status(ch, first, last, domains, cusum, version)
    log(
        f"detected hours {hour_text(status.first_hour)} .. {hour_text(status.last_hour)} "
        f"({status.hours} h, {status.rows} rows) in {status.duration_s:.1f} s"
    )
    outcome = update_events(ch, status, params, version)
    events_written(ch)
    failures: list[Exception] = []
    try:
        posted = announce(ch, outcome, status.last_hour, params, version, log)
    except RuntimeError as exc:
        failures.append(exc)
        posted = 0
    by_consumer = events_by_consumer(ch, outcome["all"], consumers)
    consumer_posted, consumer_failures = announce_to_consumers(
        ch, by_consumer, consumers, status.last_hour, params, version, log
    )
    failures += consumer_failures
    feeds = write_feeds(store, outcome["all"], outcome["touched"], version)
    feeds += write_watchlist_feeds(store, by_consumer, version)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise RuntimeError("; ".join(str(f) for f in failures))
    return Detection(status, outcome["written"], outcome["all"], posted, feeds, consumer_posted)


_EVENT_TYPES = {
    "event_id": "object",
    "kind": "object",
    "probe_cc": "object",
    "domain": "object",
    "status": "object",
    "onset": "object",
    "start_hour": "datetime64[ns]",
    "end_hour": "datetime64[ns]",
    "networks": "object",
    "peak_networks": "int64",
    "explorer_url": "object",
    "first_detected": "datetime64[ns]",
    "updated": "datetime64[ns]",
    "announced": "object",
    "version": "datetime64[ns]",
}


def read_events(ch: ClickHouse, query: str, params: dict[str, Any]) -> pd.DataFrame:
    """Stored events with hours as numbers (``start``, ``end``; ONGOING when open)."""
    df = query_frame(ch, query, params, _EVENT_TYPES)
    df["start"] = (df["start_hour"].astype("int64") // 3_600_000_000_000).astype("int64")
    ended = df["end_hour"].notna()
    df["end"] = -1
    df.loc[ended, "end"] = df.loc[ended, "end_hour"].astype("int64") // 3_600_000_000_000
    df["end"] = df["end"].astype("int64")
    return df.drop(columns=["start_hour", "end_hour", "version"])


def write_events(ch: ClickHouse, rows: pd.DataFrame, version: datetime) -> None:
    if rows.empty:
        return
    out = rows.copy()
    out["start_hour"] = pd.to_datetime(out["start"] * 3600, unit="s")
    out["end_hour"] = pd.to_datetime(out["end"].where(out["end"] >= 0) * 3600, unit="s")
    out["version"] = pd.Timestamp(version)
    out["networks"] = out["networks"].map(lambda asns: [int(a) for a in asns])
    ch.insert_df("blocking_events", out[list(sql.EVENT_COLUMNS)])


def update_events(
    ch: ClickHouse, status: StatusRun, params: EventParams, version: datetime
) -> dict[str, Any]:
    """Group the hours a detector pass wrote into events, reconcile them with the
    stored ones and write what changed."""
    first = status.first_hour
    begin, stored = look_back(ch, first - params.baseline_hours)
    runs = query_frame(
        ch,
        sql.BLOCKING_EPISODES_SQL,
        {"start": hour_text(first), "end": hour_text(status.last_hour)},
        {
            "probe_cc": "object",
            "domain": "object",
            "start": "int64",
            "last": "int64",
            "onset_up": "bool",
            "peak_networks": "int64",
            "networks": "object",
        },
    )
    volume = query_frame(
        ch,
        sql.COUNTRY_VOLUME_SQL,
        {
            "start": hour_text(begin - 2 * params.baseline_hours),
            "end": hour_text(status.last_hour + 1),
        },
        {"hour": "int64", "probe_cc": "object", "measurements": "int64"},
    )
    episodes = pd.concat(
        [
            blocking_episodes(runs, status.last_hour),
            shutdown_episodes(volume, begin, status.last_hour, params),
        ],
        ignore_index=True,
    )
    # Blocking episodes are regrouped from the pass's first hour: one reaching back
    # before it continues the stored event that straddles it (``reconcile``), so an
    # incremental hour costs the same however long an event has been open. Every
    # stored event reaching the regrouped hours is in `stored` (``look_back``): one
    # that ended before them is left as it is, never written again (an ended event
    # was, its end re-sent by every pass: bench/bench_detector_quality.py and the
    # chunking test found it).
    written = reconcile(episodes, stored, version, blocking_from=first)
    write_events(ch, written, version)
    everything = read_events(ch, sql.ALL_EVENTS_SQL, {})
    touched = set(written["probe_cc"]) if len(written) else set()
    return {"written": written, "all": everything, "touched": touched}


def look_back(ch: ClickHouse, first_hour: int) -> tuple[int, pd.DataFrame]:
    """Where a pass regroups ``no_measurements`` episodes from, and the stored events
    it reconciles with (every one ending at or after that hour, or open).

    Shutdowns are regrouped from the countries' volumes over [begin, last]: ``begin``
    is ``first_hour`` (the pass's first hour less ``shutdown_baseline_hours``),
    moved back to the start of any stored shutdown still open or ending after it,
    until none straddles it, so none is cut at ``begin`` (a shutdown is found from
    its baseline before it). The day before the pass is regrouped because a silence
    becomes an event only on its ``shutdown_silent_hours``-th covered hour, which
    may come hours after it began: the pass's own hour still partly uploaded, or an
    hour nobody uploaded, is no evidence (review of 07e2855: hourly passes then
    never found the shutdown when looking back one hour). Episodes found again
    match their stored events, so regrouping a day costs a volume query, not
    duplicates. Blocking episodes
    need no look-back (``reconcile`` continues them). Shutdowns are few and short:
    this reaches back as far as the oldest open one."""
    begin = first_hour
    while True:
        stored = read_events(ch, sql.EVENTS_FROM_SQL, {"start": hour_text(begin)})
        active = stored[(stored["status"] != "withdrawn") & (stored["kind"] == "no_measurements")]
        earliest = min([begin, *active["start"].tolist()])
        if earliest == begin:
            return begin, stored
        begin = earliest


def announce(
    ch: ClickHouse,
    outcome: dict[str, Any],
    last_hour: int,
    params: EventParams,
    version: datetime,
    log: Callable[[str], None],
) -> int:
    """Post each pending message, recording each one sent; a failure to post fails
    the run after the others are recorded (the next run sends it again)."""
    events = outcome["all"]
    todo = pending(events.to_dict("records"), last_hour, params)
    webhook_url = settings.env("OONI_ALERT_WEBHOOK_URL")
    by_id = events.set_index("event_id")
    done: list[str] = []
    failure: Exception | None = None
    failed: set[str] = set()  # an event's later news waits for its earlier one
    posted = 0
    for item in todo:
        if item.event_id in failed:
            continue
        if item.text is not None:
            if webhook_url:
                try:
                    post_alert(webhook_url, item.text)
                except RuntimeError as exc:
                    failure = exc
                    failed.add(item.event_id)
                    continue
                posted += 1
            else:
                log(f"OONI_ALERT_WEBHOOK_URL unset; event message: {item.text}")
        done.append(item.event_id)
        by_id.loc[item.event_id, "announced"] = item.status
    if done:
        rows = by_id.loc[list(dict.fromkeys(done))].reset_index()
        write_events(ch, rows, version)
        outcome["all"] = by_id.reset_index()
    if failure is not None:
        raise failure
    return posted


def write_feeds(
    store: ObjectStore, events: pd.DataFrame, touched: set[str], generated: datetime
) -> list[str]:
    """The global feed and the feeds of the countries whose events changed."""
    keys = [feed_key(None)]
    store.put_bytes(keys[0], build_feed(events, None, generated))
    for cc in sorted(touched):
        if not COUNTRY_CODE.match(str(cc)):
            continue
        key = feed_key(cc)
        store.put_bytes(key, build_feed(events, cc, generated))
        keys.append(key)
    return keys
