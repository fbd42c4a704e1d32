"""The watchlist file's consumers (newsrooms) in the detector: each gets the events
touching its domains in its own feed, and, when it names a webhook variable, their
messages.

Which events: those whose domain is a consumer's domain or under it, label by label,
matched by the watchlist exports' own query (``exports.watchlists.matching_sql``).

Messages are sent once per event and status change, per consumer, as the operator's
(``announce``): what each consumer was told is recorded in
``blocking_consumer_announced`` (consumer, event_id, announced), not in the event's
row. A separate table keeps one consumer's delivery independent of the others' and of
the operator's: a consumer whose webhook fails is retried by the next run alone, from
its own record, while the others, recorded as sent, are not sent again; a consumer
added later starts with no record (news older than ``announce_within_hours`` is
recorded without a message, as for the operator). A consumer's webhook URL is a secret
read from the environment variable the file names; errors and logs name the variable,
never its value.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import pandas as pd

from ooni_pipeline import settings
from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.detector import sql
from ooni_pipeline.detector.announce import pending
from ooni_pipeline.detector.events import EventParams
from ooni_pipeline.detector.feeds import build_watchlist_feed, watchlist_feed_key
from ooni_pipeline.exports.watchlist_file import Consumer
from ooni_pipeline.exports.watchlists import pair_params
from ooni_pipeline.object_store.stores import ObjectStore
from ooni_pipeline.operations.alerts import post_alert


def events_by_consumer(
    ch: ClickHouse, events: pd.DataFrame, consumers: dict[str, Consumer]
) -> dict[str, pd.DataFrame]:
    """Each consumer's events: those whose domain is, or is under, one of its domains."""
    names = list(consumers)
    domains = sorted({str(d) for d in events["domain"]} - {""}) if len(events) else []
    watched: dict[str, set[str]] = {name: set() for name in names}
    if names and domains:
        params = pair_params({n: c.domains for n, c in consumers.items()}, names)
        rows = ch.query_rows(sql.EVENT_CONSUMERS_SQL, {**params, "event_domains": domains})
        for domain, index in rows:
            watched[names[int(index)]].add(str(domain))
    return {name: events[events["domain"].isin(watched[name])] for name in names}


def write_watchlist_feeds(
    store: ObjectStore, by_consumer: dict[str, pd.DataFrame], generated: datetime
) -> list[str]:
    """Every consumer's feed, each run: a consumer just added has one at once."""
    keys = []
    for name, events in by_consumer.items():
        key = watchlist_feed_key(name)
        store.put_bytes(key, build_watchlist_feed(events, name, generated))
        keys.append(key)
    return keys


def announce_to_consumers(
    ch: ClickHouse,
    by_consumer: dict[str, pd.DataFrame],
    consumers: dict[str, Consumer],
    last_hour: int,
    params: EventParams,
    version: datetime,
    log: Callable[[str], None],
) -> tuple[dict[str, int], list[Exception]]:
    """Post each consumer's pending messages to its webhook, recording what each was
    sent. Returns the messages posted per consumer and the failures: a consumer whose
    webhook fails is left at its first failure (the rest of its messages wait for the
    next run), and the others go on."""
    posted: dict[str, int] = {}
    failures: list[Exception] = []
    if not any(c.webhook_env for c in consumers.values()):
        return posted, failures
    ensure_tables(ch, "blocking_consumer_announced")
    told: dict[tuple[str, str], str] = {
        (str(c), str(e)): str(a) for c, e, a in ch.query_rows(sql.CONSUMER_ANNOUNCED_SQL)
    }
    for name, consumer in consumers.items():
        if consumer.webhook_env is None:
            continue
        url = settings.env(consumer.webhook_env)
        if url is None:
            log(f"consumer {name}: {consumer.webhook_env} is unset; its messages wait")
            continue
        events = [
            {**event, "announced": told.get((name, event["event_id"]), "")}
            for event in by_consumer[name].to_dict("records")
        ]
        done: list[tuple[str, str]] = []
        posted[name] = 0
        for item in pending(events, last_hour, params):
            if item.text is not None:
                try:
                    if not url.startswith(("https://", "http://")):
                        raise RuntimeError(f"{consumer.webhook_env} is not an http(s) URL")
                    post_alert(url, item.text, variable=consumer.webhook_env)
                except RuntimeError as exc:
                    failures.append(RuntimeError(f"consumer {name}: {exc}"))
                    break
                posted[name] += 1
            done.append((item.event_id, item.status))
        latest = dict(done)  # an event's start then its end: one row, its last news
        if latest:
            ch.insert_df(
                "blocking_consumer_announced",
                pd.DataFrame(
                    {
                        "consumer": name,
                        "event_id": list(latest),
                        "announced": list(latest.values()),
                        "version": pd.Timestamp(version),
                    }
                ),
            )
    return posted, failures
