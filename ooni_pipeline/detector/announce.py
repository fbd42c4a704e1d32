"""One chat message per new, ended or withdrawn event, through the project's alert
webhook (``OONI_ALERT_WEBHOOK_URL``, ``operations.alerts.post_alert``).

What was announced is recorded on the event (column ``announced``), so a message is
sent once, and one that failed to send is sent by the next run. Events whose news
is older than ``announce_within_hours`` before the last hour detected, or before the
current hour (a backfill over history, whatever its chunks), are marked without a
message. Domains and country codes come from
test lists and probes: they are shown as literals (``untrusted.chat_literal``);
the Explorer link is URL-encoded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ooni_pipeline.detector.events import ONGOING, EventParams
from ooni_pipeline.detector.feeds import entry_summary
from ooni_pipeline.untrusted import chat_literal

HEADLINES = {
    ("blocking", "ongoing"): ":red_circle: OONI blocking detector: blocking started",
    ("blocking", "ended"): ":large_green_circle: OONI blocking detector: blocking ended",
    ("no_measurements", "ongoing"): ":warning: OONI blocking detector: no measurements",
    (
        "no_measurements",
        "ended",
    ): ":large_green_circle: OONI blocking detector: measurements resumed",
}


def current_hour() -> int:
    """Hours since the epoch now (UTC): the wall clock news is judged against. A
    function of its own so the tests can replay a timeline as if it were live."""
    return int(time.time() // 3600)


@dataclass(frozen=True)
class Announcement:
    event_id: str
    status: str  # what ``announced`` becomes
    text: str | None  # None: recorded without a message (too old, or not news)


def message(event: dict) -> str:
    if event["status"] == "withdrawn":
        headline = ":information_source: OONI blocking detector: event withdrawn after re-detection"
    else:
        headline = HEADLINES[(event["kind"], event["status"])]
    return f"{headline}\n{chat_literal(entry_summary(event))}\n{event['explorer_url']}"


def pending(events: list[dict], last_hour: int, params: EventParams) -> list[Announcement]:
    """What to announce about these events (all of them, as stored now), in the order
    to send: by the hour of the news, an event's start before its end.

    An event's news is its start (``onset`` ``change`` only: found already blocked is
    no news) and its end, or its withdrawal once something was announced. Each is
    announced once whichever way the hours were detected: an event that started and
    ended between two passes (one pass over a day, a backfill in chunks) gets its
    "started" message, then its "ended", as hour-by-hour passes would have sent them.
    News older than ``announce_within_hours`` before the last hour detected, or
    before the current hour, is recorded without a message: a backfill over history
    in chunks of a day would otherwise announce each chunk's events, each being
    recent for its own last hour."""
    oldest_news = max(last_hour, current_hour()) - params.announce_within_hours
    out: list[tuple[int, int, Announcement]] = []
    for event in events:
        status, announced, event_id = event["status"], event["announced"], event["event_id"]
        if status == announced:
            continue
        if status == "withdrawn":
            text = message(event) if announced in ("ongoing", "ended") else None
            if announced != "withdrawn":
                out.append((last_hour, 2, Announcement(event_id, status, text)))
            continue
        started_news = event["onset"] == "change" and announced == ""
        if started_news:
            fresh = event["start"] >= oldest_news
            started = {**event, "status": "ongoing", "end": ONGOING}
            text = message(started) if fresh else None
            out.append((event["start"], 0, Announcement(event_id, "ongoing", text)))
        if status == "ended":
            text = message(event) if event["end"] >= oldest_news else None
            out.append((event["end"], 1, Announcement(event_id, "ended", text)))
        elif not started_news and event["onset"] == "change":
            # announced "ended" or "withdrawn" before, open again: recorded, no news.
            # An ``initial`` one stays unrecorded: should late rows show its onset
            # after all (``change``), its start is news then.
            out.append((event["start"], 0, Announcement(event_id, "ongoing", None)))
    return [a for _, _, a in sorted(out, key=lambda item: (item[0], item[1], item[2].event_id))]
