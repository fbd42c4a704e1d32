"""``blocking_events``: series changes grouped into one event per episode.

OONI's detector emits a changepoint per network and signal, so one national block
is up to ~1,800 alerts (ooni/data ``docs/implementation-plan.md``, "No event
entity", §3.7). Here an event is an episode:

- ``blocking``: one per (country, domain), the maximal run of hours in which at
  least one network of that country has the domain BLOCKED (found by ClickHouse,
  ``sql.BLOCKING_EPISODES_SQL``). It lists every network
  blocked during it and the most blocked at once. ``onset`` is ``change`` when the
  first network got there by an OK -> BLOCKED change, ``initial`` when the detector
  found it blocked from the start (no news, not announced; its end is). ``end_hour``
  is the first hour with no network blocked.
- ``no_measurements``: a country whose web_connectivity measurements stop: after a
  steady volume (``baseline_hours`` hours, each with measurements, median at least
  ``min_hourly``), ``silent_hours`` or more hours without any. Hours in which the
  whole of ``fastpath`` is thin (below ``coverage_share`` of its own median: data
  not yet uploaded, an ingestion delay) are no evidence and are skipped.

Ids stay stable under re-detection: a recomputed episode takes the id of the stored
event of the same (kind, country, domain) that it overlaps, whatever its new start
or end; only an episode overlapping none gets a new id (a hash of kind, country,
domain and start hour). A stored event overlapped by no recomputed episode is
``withdrawn``: kept, updated, never deleted or duplicated.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from urllib.parse import urlencode

import numpy as np
import pandas as pd

from ooni_pipeline.detector.status import EPOCH

EXPLORER_CHART_URL = "https://explorer.ooni.org/chart/mat"
ONGOING = -1  # end hour of an ongoing episode


@dataclass(frozen=True)
class EventParams:
    """Grouping and shutdown parameters (recorded in the asset's metadata)."""

    baseline_hours: int = 24
    min_hourly: float = 10.0
    silent_hours: int = 2
    coverage_share: float = 0.5
    announce_within_hours: int = 48

    def as_metadata(self) -> dict[str, float]:
        return asdict(self)


EPISODE_COLUMNS = (
    "kind",
    "probe_cc",
    "domain",
    "start",
    "end",
    "onset",
    "networks",
    "peak_networks",
)


def _episodes_frame(records: dict[str, object]) -> pd.DataFrame:
    return pd.DataFrame({name: records[name] for name in EPISODE_COLUMNS})


def blocking_episodes(runs: pd.DataFrame, last_hour: int) -> pd.DataFrame:
    """Episodes from ClickHouse's runs of blocked hours (``sql.BLOCKING_EPISODES_SQL``:
    probe_cc, domain, start, last, onset_up, peak_networks, networks) of a range
    ending at ``last_hour``: a run reaching ``last_hour`` is ongoing."""
    if runs.empty:
        return _episodes_frame({name: [] for name in EPISODE_COLUMNS})
    last = runs["last"].to_numpy(np.int64)
    return _episodes_frame(
        {
            "kind": "blocking",
            "probe_cc": runs["probe_cc"].to_numpy(),
            "domain": runs["domain"].to_numpy(),
            "start": runs["start"].to_numpy(np.int64),
            "end": np.where(last >= last_hour, ONGOING, last + 1),
            "onset": np.where(runs["onset_up"].to_numpy(bool), "change", "initial"),
            "networks": [[int(a) for a in asns] for asns in runs["networks"]],
            "peak_networks": runs["peak_networks"].to_numpy(np.int64),
        }
    )


def shutdown_episodes(
    volume: pd.DataFrame, first: int, last: int, params: EventParams
) -> pd.DataFrame:
    """``no_measurements`` episodes starting in [first, last], from the countries'
    hourly volumes (columns hour, probe_cc, measurements) of [first - baseline, last].

    Works on the hours x countries matrix: the rolling baseline, the silent runs and
    their ends are array operations per country column."""
    empty = _episodes_frame({name: [] for name in EPISODE_COLUMNS})
    if volume.empty:
        return empty
    # The whole frame read: a baseline of covered hours may reach back further than
    # baseline_hours of the clock when some hours were not covered.
    start = min(first - params.baseline_hours, int(volume["hour"].min()))
    matrix = (
        volume.pivot_table(
            index="hour", columns="probe_cc", values="measurements", aggfunc="sum", fill_value=0
        )
        .reindex(range(start, last + 1), fill_value=0)
        .astype(np.float64)
    )
    total = matrix.sum(axis=1)
    # The usual volume of the whole table, from the hours that had any data at all.
    typical = total.where(total > 0).rolling(params.baseline_hours, min_periods=1).median().shift(1)
    covered = (total > 0) & ((total >= params.coverage_share * typical) | typical.isna())
    matrix = matrix[covered.to_numpy()]
    if matrix.empty:
        return empty
    hours = matrix.index.to_numpy(np.int64)
    values = matrix.to_numpy()
    silent = values == 0
    # Baseline before each hour: the previous baseline_hours covered hours.
    window = params.baseline_hours
    steady_min = matrix.rolling(window, min_periods=window).min().shift(1).to_numpy()
    steady_median = matrix.rolling(window, min_periods=window).median().shift(1).to_numpy()
    steady = (steady_min >= 1) & (steady_median >= params.min_hourly)
    run_start = silent & ~np.vstack([np.zeros((1, values.shape[1]), bool), silent[:-1]])
    records: dict[str, list] = {name: [] for name in EPISODE_COLUMNS}
    # Loops over countries and their silent runs, never over hours or rows.
    for column, cc in enumerate(matrix.columns):
        heard = np.flatnonzero(~silent[:, column])
        for row in np.flatnonzero(run_start[:, column] & steady[:, column]):
            after = heard[heard > row]
            stop = int(after[0]) if len(after) else len(hours)
            if stop - row < params.silent_hours or hours[row] < first:
                continue
            records["kind"].append("no_measurements")
            records["probe_cc"].append(str(cc))
            records["domain"].append("")
            records["start"].append(int(hours[row]))
            records["end"].append(int(hours[stop]) if len(after) else ONGOING)
            records["onset"].append("change")
            records["networks"].append([])
            records["peak_networks"].append(0)
    return _episodes_frame(records) if records["kind"] else empty


def event_id(kind: str, probe_cc: str, domain: str, start: int) -> str:
    """The id a new event gets: stable for its first (kind, country, domain, start)."""
    text = "\x1f".join((kind, probe_cc, domain, str(int(start))))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def hour_datetime(hour: int) -> datetime:
    return EPOCH + timedelta(hours=int(hour))


def explorer_url(kind: str, probe_cc: str, domain: str, start: int, end: int) -> str:
    """OONI Explorer's measurement chart of the event: a week before its start to a
    day after its end (a week after the start while ongoing)."""
    since = hour_datetime(start) - timedelta(days=7)
    until = (
        hour_datetime(end) + timedelta(days=1)
        if end != ONGOING
        else hour_datetime(start) + timedelta(days=7)
    )
    params = {"probe_cc": probe_cc, "test_name": "web_connectivity"}
    if kind == "blocking":
        params["domain"] = domain
    params |= {
        "since": f"{since:%Y-%m-%d}",
        "until": f"{until:%Y-%m-%d}",
        "axis_x": "measurement_start_day",
    }
    return f"{EXPLORER_CHART_URL}?{urlencode(params)}"


def _overlaps(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    a_stop = np.inf if a_end == ONGOING else a_end
    b_stop = np.inf if b_end == ONGOING else b_end
    return a_start < b_stop and b_start < a_stop


def _continued(episode: dict, active: list[dict], blocking_from: int | None) -> dict:
    """A blocking episode found from ``blocking_from`` (the first hour regrouped) that
    continues a stored event straddling that hour (open, or ending at or after it):
    the event's start and onset, which the hours before ``blocking_from`` decided, and
    its networks with the episode's (re-detected hours add networks to an open event and
    never remove one: late rows clearing a network leave it listed). Hours before
    ``blocking_from`` are not rewritten
    by the pass, so the stored event still describes them."""
    if blocking_from is None or episode["kind"] != "blocking" or episode["start"] != blocking_from:
        return episode
    for stored in active:
        reaches = stored["end"] == ONGOING or stored["end"] >= blocking_from
        if stored["start"] < blocking_from and reaches:
            networks = sorted({*map(int, stored["networks"]), *map(int, episode["networks"])})
            return {
                **episode,
                "start": int(stored["start"]),
                "onset": stored["onset"],
                "networks": networks,
                "peak_networks": max(int(stored["peak_networks"]), int(episode["peak_networks"])),
            }
    return episode


def _before_regrouped(stored: dict, episode: dict, blocking_from: int | None) -> bool:
    """Whether ``stored`` started before the regrouped hours and ``episode`` does not
    continue it: then it is not that episode's event, however they overlap (a
    later episode of the same domain within the pass would take its id and erase
    its hours before ``blocking_from``); it ends at ``blocking_from`` instead."""
    return (
        blocking_from is not None
        and episode["kind"] == "blocking"
        and stored["start"] < blocking_from
        and stored["start"] != episode["start"]
    )


def reconcile(
    episodes: pd.DataFrame,
    stored: pd.DataFrame,
    now: datetime,
    blocking_from: int | None = None,
) -> pd.DataFrame:
    """The event rows to write: recomputed episodes matched to the stored events they
    overlap (keeping their ids), new ones, and stored ones no longer found
    (withdrawn). Rows whose content did not change are left out.

    With ``blocking_from`` (the first hour blocking episodes were regrouped from), a
    blocking episode starting there continues the stored event straddling it
    (``_continued``); a stored blocking event starting before it that no episode
    continues ended there (its hours before are as they were), and one that ended
    before it is left as it is.

    ``stored`` has the table's columns with hours as numbers (``start``, ``end``).
    Runs once per event, not per series or hour: events are few."""
    rows: list[dict] = []
    stored = stored.sort_values("start", kind="stable")
    by_id = {row["event_id"]: row for row in stored.to_dict("records")}
    active: dict[tuple, list[dict]] = {}
    for row in by_id.values():
        if row["status"] != "withdrawn":
            active.setdefault((row["kind"], row["probe_cc"], row["domain"]), []).append(row)
    matched: set[str] = set()
    for episode in episodes.sort_values("start", kind="stable").to_dict("records"):
        key = (episode["kind"], episode["probe_cc"], episode["domain"])
        episode = _continued(episode, active.get(key, []), blocking_from)
        previous = next(
            (
                s
                for s in active.get(key, [])
                if s["event_id"] not in matched
                and _overlaps(s["start"], s["end"], episode["start"], episode["end"])
                and not _before_regrouped(s, episode, blocking_from)
            ),
            None,
        )
        if previous is None:
            new_id = event_id(*key, episode["start"])
            previous = by_id.get(new_id)  # a withdrawn event found again
            identity = new_id
        else:
            identity = previous["event_id"]
        matched.add(identity)
        row = {
            "event_id": identity,
            "kind": episode["kind"],
            "probe_cc": episode["probe_cc"],
            "domain": episode["domain"],
            "status": "ongoing" if episode["end"] == ONGOING else "ended",
            "onset": episode["onset"],
            "start": int(episode["start"]),
            "end": int(episode["end"]),
            "networks": list(episode["networks"]),
            "peak_networks": int(episode["peak_networks"]),
        }
        row["explorer_url"] = explorer_url(
            row["kind"], row["probe_cc"], row["domain"], row["start"], row["end"]
        )
        if previous is not None and _same_content(row, previous):
            continue
        row["first_detected"] = previous["first_detected"] if previous is not None else now
        row["updated"] = now
        announced = previous["announced"] if previous is not None else ""
        row["announced"] = (
            "" if previous is not None and previous["status"] == "withdrawn" else announced
        )
        rows.append(row)
    for row in by_id.values():
        if row["status"] == "withdrawn" or row["event_id"] in matched:
            continue
        if row["kind"] == "blocking" and blocking_from is not None:
            if row["end"] != ONGOING and row["end"] <= blocking_from:
                continue  # not regrouped: as it was
            if row["start"] < blocking_from:  # blocked up to the regrouped hours
                ended = {**row, "status": "ended", "end": blocking_from}
                ended["explorer_url"] = explorer_url(
                    row["kind"], row["probe_cc"], row["domain"], row["start"], blocking_from
                )
                rows.append({**ended, "updated": now})
                continue
        rows.append({**row, "status": "withdrawn", "updated": now})
    return pd.DataFrame(rows)


def _same_content(row: dict, stored: dict) -> bool:
    return (
        row["status"] == stored["status"]
        and row["onset"] == stored["onset"]
        and row["start"] == stored["start"]
        and row["end"] == stored["end"]
        and list(row["networks"]) == [int(a) for a in stored["networks"]]
        and row["peak_networks"] == int(stored["peak_networks"])
    )
