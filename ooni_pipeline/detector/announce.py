"""One chat message per new, ended or withdrawn event, through the project's alert
webhook (``OONI_ALERT_WEBHOOK_URL``, ``operations.alerts.post_alert``).

What was announced is recorded on the event (column ``announced``), so a message is
sent once, and one that failed to send is sent by the next run. Events whose news
is older than ``announce_within_hours`` before the last hour detected (a backfill
over history) are marked without a message. Domains and country codes come from
test lists and probes: they are shown as literals (``untrusted.chat_literal``);
the Explorer link is URL-encoded.
"""

from __future__ import annotations

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
    """What to announce about these events (all of them, as stored now)."""
    oldest_news = last_hour - params.announce_within_hours
    out = []
    for event in events:
        status, announced = event["status"], event["announced"]
        if status == announced:
            continue
        if status == "withdrawn":
            if announced in ("ongoing", "ended"):
                out.append(Announcement(event["event_id"], status, message(event)))
            elif announced != "withdrawn":
                out.append(Announcement(event["event_id"], status, None))
            continue
        if status == "ongoing" and event["onset"] == "initial":
            continue  # found already blocked: its end is the news
        news_hour = event["start"] if status == "ongoing" else event["end"]
        if news_hour == ONGOING or news_hour < oldest_news:
            out.append(Announcement(event["event_id"], status, None))
        else:
            out.append(Announcement(event["event_id"], status, message(event)))
    return out
