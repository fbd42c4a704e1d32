"""Atom feeds (RFC 4287) of blocking events: ``feeds/blocking/<CC>.atom`` per country
and ``feeds/blocking/global.atom``, as asked in ooni/spec#144, and
``feeds/watchlists/<consumer>.atom`` per consumer of the watchlist file.

Built with ``xml.etree.ElementTree``, which escapes every text and attribute; the
characters XML 1.0 cannot carry at all (controls) are removed first, since a domain
or country code comes from test lists and probes. Country codes are object keys, so
only two capital letters make a per-country feed.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import datetime

import pandas as pd

from ooni_pipeline.detector.events import ONGOING, hour_datetime

ATOM_NS = "http://www.w3.org/2005/Atom"
FEED_PREFIX = "feeds/blocking/"
GLOBAL_KEY = f"{FEED_PREFIX}global.atom"
WATCHLIST_FEED_PREFIX = "feeds/watchlists/"
MAX_ENTRIES = 100
TAG_AUTHORITY = "tag:ooni.org,2024:"
COUNTRY_CODE = re.compile(r"^[A-Z]{2}$")
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

ET.register_namespace("", ATOM_NS)


def feed_key(probe_cc: str | None) -> str:
    """The object key of a country's feed (``None``: the global one)."""
    if probe_cc is None:
        return GLOBAL_KEY
    if not COUNTRY_CODE.match(probe_cc):
        raise ValueError(f"not a country code: {probe_cc!r}")
    return f"{FEED_PREFIX}{probe_cc}.atom"


def watchlist_feed_key(consumer: str) -> str:
    """The object key of a consumer's feed (its name is a validated path segment)."""
    return f"{WATCHLIST_FEED_PREFIX}{consumer}.atom"


def _text(value: object) -> str:
    return _NOT_XML.sub("\ufffd", str(value))


def _rfc3339(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H:%M:%S}Z"


def _hour(hour: int) -> str:
    return f"{hour_datetime(hour):%Y-%m-%d %H:00} UTC"


def entry_title(event: dict) -> str:
    where = event["probe_cc"]
    if event["kind"] == "no_measurements":
        return (
            f"No measurements from {where}"
            if event["status"] == "ongoing"
            else f"Measurements from {where} resumed"
        )
    if event["status"] == "ongoing":
        return f"{event['domain']} blocked in {where}"
    return f"{event['domain']} reachable again in {where}"


def entry_summary(event: dict) -> str:
    """Plain text: what, where, when, which networks."""
    lines = [entry_title(event) + "."]
    lines.append(f"Since {_hour(event['start'])}")
    if event["end"] != ONGOING:
        lines[-1] += f", until {_hour(event['end'])}"
    lines[-1] += "."
    if event["kind"] == "blocking":
        networks = ", ".join(f"AS{asn}" for asn in event["networks"])
        lines.append(
            f"Networks: {networks} (at most {event['peak_networks']} at once)."
            + (" Already blocked when first measured." if event["onset"] == "initial" else "")
        )
    lines.append(f"OONI Explorer: {event['explorer_url']}")
    return "\n".join(lines)


def build_feed(events: pd.DataFrame, probe_cc: str | None, generated: datetime) -> bytes:
    """One feed: the most recently updated ``MAX_ENTRIES`` events (withdrawn ones
    left out). ``generated`` is the feed's ``updated`` when it has no entries."""
    scope = probe_cc or "global"
    rows = events[events["status"] != "withdrawn"]
    if probe_cc is not None:
        rows = rows[rows["probe_cc"] == probe_cc]
    entries = [(event, "", event["updated"]) for event in rows.to_dict("records")]
    return _feed(
        entries,
        f"{TAG_AUTHORITY}feeds/blocking/{scope}",
        f"OONI blocking events: {probe_cc}" if probe_cc else "OONI blocking events: all countries",
        f"https://explorer.ooni.org/country/{probe_cc}"
        if probe_cc
        else "https://explorer.ooni.org/",
        generated,
    )


def build_watchlist_feed(events: pd.DataFrame, consumer: str, generated: datetime) -> bytes:
    """A consumer's feed, of ``events`` (those touching its domains; withdrawn ones
    left out). A start and an end are news each, so an event that ended is two
    entries: its start (the event's entry id, ``updated`` when first detected) and its
    end (the id with ``:ended``, ``updated`` when the event last changed); a reader
    that shows only new entries still learns that a site is reachable again
    (ooni/backend#520). An event found blocked from the start has only its entry."""
    entries = []
    for event in events[events["status"] != "withdrawn"].to_dict("records"):
        if event["status"] == "ongoing":
            entries.append((event, "", event["updated"]))
            continue
        if event["onset"] == "change":
            start = {**event, "status": "ongoing", "end": ONGOING}
            entries.append((start, "", event["first_detected"]))
        entries.append((event, ":ended", event["updated"]))
    return _feed(
        entries,
        f"{TAG_AUTHORITY}feeds/watchlists/{consumer}",
        f"OONI blocking events: watchlist {consumer}",
        "https://explorer.ooni.org/",
        generated,
    )


def _feed(
    entries: list[tuple[dict, str, object]],
    feed_id: str,
    title: str,
    alternate: str,
    generated: datetime,
) -> bytes:
    """A feed of the ``MAX_ENTRIES`` most recently updated entries, each (event, id
    suffix, updated)."""
    entries = sorted(entries, key=lambda e: (-pd.Timestamp(e[2]).value, e[0]["event_id"], e[1]))
    entries = entries[:MAX_ENTRIES]
    feed = ET.Element(f"{{{ATOM_NS}}}feed")
    _sub(feed, "id", feed_id)
    _sub(feed, "title", title)
    updated = max(pd.Timestamp(e[2]) for e in entries) if entries else generated
    _sub(feed, "updated", _rfc3339(pd.Timestamp(updated).to_pydatetime()))
    author = ET.SubElement(feed, f"{{{ATOM_NS}}}author")
    _sub(author, "name", "OONI")
    _sub(author, "uri", "https://ooni.org/")
    ET.SubElement(feed, f"{{{ATOM_NS}}}link", rel="alternate", href=alternate)
    _sub(feed, "generator", "ooni_pipeline blocking detector")
    for event, suffix, entry_updated in entries:
        entry = ET.SubElement(feed, f"{{{ATOM_NS}}}entry")
        _sub(entry, "id", f"{TAG_AUTHORITY}blocking-event:{event['event_id']}{suffix}")
        _sub(entry, "title", entry_title(event))
        _sub(entry, "updated", _rfc3339(pd.Timestamp(entry_updated).to_pydatetime()))
        published = entry_updated if suffix else event["first_detected"]
        _sub(entry, "published", _rfc3339(pd.Timestamp(published).to_pydatetime()))
        ET.SubElement(
            entry,
            f"{{{ATOM_NS}}}link",
            rel="alternate",
            type="text/html",
            href=_text(event["explorer_url"]),
        )
        ET.SubElement(entry, f"{{{ATOM_NS}}}category", term=event["kind"])
        _sub(entry, "summary", entry_summary(event)).set("type", "text")
    return ET.tostring(feed, encoding="utf-8", xml_declaration=True)


def _sub(parent: ET.Element, name: str, text: str) -> ET.Element:
    element = ET.SubElement(parent, f"{{{ATOM_NS}}}{name}")
    element.text = _text(text)
    return element
