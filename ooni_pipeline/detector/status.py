"""``blocking_status``: the detector run over a range of hours, from ClickHouse to
ClickHouse.

ClickHouse counts each series' outcomes per hour (one query for the whole range);
``cusum.step`` advances every series at once, hour by hour; the rows go back in
chunks of a day. Every series the detector still remembers gets a row every hour,
measured or not, so the state at any hour is a plain read of the hour before.

Which hours are computed is decided by the table itself, so late data and holes are
handled the same way:

- back: from the hour after the last one already in the table (within the memory
  window), when the requested range starts later: a skipped hour is computed, never
  treated as silent;
- forward: up to the last hour already in the table, when the requested range ends
  earlier: rows that arrived late for a past hour change every state after it, so
  everything after is re-detected.

A pass writes into a staging table and nothing reaches ``blocking_status`` until
every hour is computed: the partitions (days) the pass touched are then completed in staging
(their live rows outside the range copied over) and replace the live ones by
``ALTER TABLE … REPLACE PARTITION``, a metadata-only swap of parts, atomic for one
day. A pass that fails while computing leaves the live table as it was; one that
fails while swapping days in leaves a prefix (``replace_partitions``), never new
hours after old ones; and a series that left the watchlist leaves no stale rows
behind in the re-detected hours.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.detector import sql
from ooni_pipeline.detector.cusum import CusumParams, SeriesState, remembered, step
from ooni_pipeline.exports.website_metrics_sql import CATEGORIES

HOURS_PER_INSERT = 24
EPOCH = datetime(1970, 1, 1)


def hour_number(moment: datetime) -> int:
    """Hours since the epoch of a naive UTC (or aware) datetime, floored."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return int((moment - EPOCH).total_seconds() // 3600)


def hour_text(hour: int) -> str:
    """``YYYY-MM-DD HH:00:00`` of an hour number: how hours travel as bound parameters."""
    return f"{EPOCH + timedelta(hours=int(hour)):%Y-%m-%d %H:%M:%S}"


@dataclass
class StatusRun:
    """What a run computed: the hours written and the figures for metadata."""

    first_hour: int
    last_hour: int
    requested: tuple[int, int]
    series: int
    rows: int
    measured_rows: int
    changes_to_blocked: int
    changes_to_ok: int
    blocked_at_end: int
    duration_s: float
    version: datetime

    @property
    def hours(self) -> int:
        return self.last_hour - self.first_hour + 1


def _scalar_hour(ch: ClickHouse, query: str, params: dict[str, str]) -> int | None:
    value = ch.scalar(query, params)
    return None if value is None else hour_number(value)


def plan_hours(ch: ClickHouse, first: int, last: int, params: CusumParams) -> tuple[int, int]:
    """(first, last) hours to compute for a request of [first, last]: extended over
    the hours of a swap that was interrupted (``replace_partitions``), then back over
    unprocessed hours and forward over processed ones."""
    ensure_tables(ch, "blocking_status_redo")
    redo = ch.query_rows(sql.REDO_SQL)
    if redo:
        first = min(first, hour_number(redo[0][0]))
        last = max(last, hour_number(redo[0][1]))
    before = _scalar_hour(
        ch,
        sql.LAST_HOUR_BEFORE_SQL,
        {"hour": hour_text(first), "since": hour_text(first - params.forget_after_hours)},
    )
    after = _scalar_hour(ch, sql.LAST_HOUR_SQL, {"hour": hour_text(first - 1)})
    start = before + 1 if before is not None else first
    end = max(last, after) if after is not None else last
    return start, end


def query_frame(ch: ClickHouse, query: str, params: dict, columns: dict[str, str]) -> pd.DataFrame:
    """A query's result with these columns and dtypes, also when it has no rows
    (an empty result comes back without columns)."""
    df = ch.query_df(query, params)
    if df.empty:
        return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})
    return df.astype(columns)


_KEY_TYPES = {"probe_cc": "object", "probe_asn": "uint32", "domain": "object"}


def _previous_state(ch: ClickHouse, hour: int) -> pd.DataFrame:
    types = {
        **_KEY_TYPES,
        "state": "int8",
        "s_pos": "float64",
        "s_neg": "float64",
        "last_measured": "int64",
    }
    return query_frame(ch, sql.STATE_AT_SQL, {"hour": hour_text(hour)}, types)


def _observations(ch: ClickHouse, start: int, end: int, domains: list[str]) -> pd.DataFrame:
    types = {
        "hour": "int64",
        **_KEY_TYPES,
        "measurements": "int64",
        **dict.fromkeys(CATEGORIES, "int64"),
    }
    params = {"start": hour_text(start), "end": hour_text(end + 1), "domains": domains}
    return query_frame(ch, sql.HOURLY_COUNTS_SQL, params, types)


class SeriesIndex:
    """Series keys (probe_cc, probe_asn, domain) -> their position in the state
    arrays, growing as new series appear chunk after chunk."""

    KEYS = ["probe_cc", "probe_asn", "domain"]

    def __init__(self) -> None:
        self.index = pd.MultiIndex.from_arrays([[], np.array([], np.uint32), []], names=self.KEYS)
        self.cc = np.array([], object)
        self.asn = np.array([], np.uint32)
        self.domain = np.array([], object)

    def __len__(self) -> int:
        return len(self.index)

    def codes(self, df: pd.DataFrame) -> np.ndarray:
        keys = pd.MultiIndex.from_frame(df[self.KEYS])
        position = self.index.get_indexer(keys) if len(self.index) else np.full(len(keys), -1)
        if (position < 0).any():
            fresh = keys[position < 0].unique()
            self.index = self.index.append(fresh)
            self.cc = np.concatenate([self.cc, fresh.get_level_values(0).to_numpy(object)])
            self.asn = np.concatenate([self.asn, fresh.get_level_values(1).to_numpy(np.uint32)])
            self.domain = np.concatenate([self.domain, fresh.get_level_values(2).to_numpy(object)])
            position = self.index.get_indexer(keys)
        return position


def run_status(
    ch: ClickHouse,
    first: int,
    last: int,
    domains: list[str],
    params: CusumParams,
    version: datetime | None = None,
) -> StatusRun:
    """Detect over the hours [first, last] (extended as the module says) and write
    their rows. ``version`` (the rows' ``update_time``) defaults to now.

    A day at a time: ClickHouse deduplicates and counts one day of ``fastpath``,
    the state arrays step through its hours, its rows go back in one insert. Memory
    stays that of a day, whatever the range."""
    started = time.monotonic()
    version = version or datetime.now(UTC).replace(tzinfo=None)
    start, end = plan_hours(ch, first, last, params)
    ensure_tables(ch, sql.STATUS_STAGING)
    ch.command(f"TRUNCATE TABLE {sql.STATUS_STAGING}")

    series = SeriesIndex()
    mem = SeriesState.empty(0)
    previous = _previous_state(ch, start - 1)
    if len(previous):
        codes = series.codes(previous)
        mem = mem.grown(len(series))
        mem.state[codes] = previous["state"].to_numpy(np.int8)
        mem.s_pos[codes] = previous["s_pos"].to_numpy(np.float64)
        mem.s_neg[codes] = previous["s_neg"].to_numpy(np.float64)
        mem.last_measured[codes] = previous["last_measured"].to_numpy(np.int64)

    writer = _RowWriter(ch, series, version)
    figures = {"rows": 0, "measured": 0, "up": 0, "down": 0}
    for chunk_start in range(start, end + 1, HOURS_PER_INSERT):
        chunk_end = min(end, chunk_start + HOURS_PER_INSERT - 1)
        observed = _observations(ch, chunk_start, chunk_end, domains)
        obs_codes = series.codes(observed)
        mem = mem.grown(len(series))
        n = len(series)
        obs_hours = observed["hour"].to_numpy(np.int64)
        counts = {c: observed[c].to_numpy(np.float64) for c in CATEGORIES}
        total = observed["measurements"].to_numpy(np.float64)
        usable = total - counts["failure"]
        blocked = sum(counts[c] for c in sql.BLOCKED_CATEGORIES)
        y_all = np.divide(blocked, usable, out=np.zeros_like(total), where=usable > 0)
        bounds = np.searchsorted(obs_hours, np.arange(chunk_start, chunk_end + 2))
        for offset, hour in enumerate(range(chunk_start, chunk_end + 1)):
            lo, hi = bounds[offset], bounds[offset + 1]
            idx_all = obs_codes[lo:hi]
            # Hours with only failed measurements carry no evidence (OONI's w == 0).
            has_usable = usable[lo:hi] > 0
            idx = idx_all[has_usable]
            change = np.zeros(n, np.int8)
            change[idx] = step(
                mem, hour, idx, y_all[lo:hi][has_usable], usable[lo:hi][has_usable], params
            )
            alive = np.flatnonzero(remembered(mem, hour, params))
            measured = np.zeros(n, np.uint32)
            measured[idx_all] = total[lo:hi].astype(np.uint32)
            shares = {}
            for category in CATEGORIES:
                column = np.zeros(n, np.float32)
                column[idx_all] = np.divide(counts[category][lo:hi], total[lo:hi])
                shares[sql.SHARE_COLUMNS[category]] = column[alive]
            y = np.zeros(n, np.float32)
            y[idx_all] = y_all[lo:hi]
            writer.add(hour, alive, measured[alive], shares, y[alive], change[alive], mem)
            figures["rows"] += len(alive)
            figures["measured"] += int(np.count_nonzero(measured[alive]))
            figures["up"] += int(np.count_nonzero(change == 1))
            figures["down"] += int(np.count_nonzero(change == -1))
        writer.flush()
    replace_partitions(ch, start, end)
    final_alive = remembered(mem, end, params)
    return StatusRun(
        first_hour=start,
        last_hour=end,
        requested=(first, last),
        series=int(np.count_nonzero(final_alive)),
        rows=figures["rows"],
        measured_rows=figures["measured"],
        changes_to_blocked=figures["up"],
        changes_to_ok=figures["down"],
        blocked_at_end=int(np.count_nonzero(final_alive & (mem.state == 2))),
        duration_s=time.monotonic() - started,
        version=version,
    )


_PARTITION_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def _partition_ids(ch: ClickHouse, query: str, params: dict[str, Any]) -> set[str]:
    ids = {str(row[0]) for row in ch.query_rows(query, params)}
    for pid in ids:
        if not _PARTITION_ID.fullmatch(pid):
            raise ValueError(f"unexpected partition id {pid!r} in {sql.STATUS_STAGING}")
    return ids


def replace_partitions(ch: ClickHouse, start: int, end: int) -> None:
    """Swap the staged hours [start, end] into ``blocking_status``, one day at a time,
    in an order whose every intermediate state is a prefix of a whole computation.

    Every partition (day) the range touches is completed in staging with its live
    rows outside the range. ClickHouse swaps one partition atomically, never several
    (an ALTER with several commands applies them one after another), so the days
    after the first leave the live table first, latest first, and then each day is
    swapped in, earliest first: a failure at any statement leaves the old hours up
    to some day, or the new hours up to some day, and nothing after. The range is
    written to ``blocking_status_redo`` before the first statement and removed after
    the last event of the pass is written (``events_written``), so the next pass
    computes it again (``plan_hours``), however far back it starts, and regroups
    its events from there: a pass failing after the swap but before its events
    were written would otherwise leave the next pass to regroup from its own first
    hour, cutting an episode that started in between (its onset lost). Staging is
    emptied afterwards. Daily partitions keep the copy of an hourly
    pass to the rest of its day."""
    bounds = {"start": hour_text(start), "end": hour_text(end)}
    touched = sorted(_partition_ids(ch, sql.TOUCHED_PARTITIONS_SQL, bounds))
    ch.command(sql.KEEP_OUTSIDE_SQL, {**bounds, "partitions": touched})
    staged = _partition_ids(ch, sql.STAGED_PARTITIONS_SQL, {})
    ch.command(
        "INSERT INTO blocking_status_redo SELECT toDateTime({start:String}, 'UTC'), "
        "toDateTime({end:String}, 'UTC'), now64(3)",
        bounds,
    )
    for pid in reversed(touched[1:]):
        ch.command(f"ALTER TABLE blocking_status DROP PARTITION ID '{pid}'")
    for number, pid in enumerate(touched):
        if pid in staged:
            ch.command(
                f"ALTER TABLE blocking_status REPLACE PARTITION ID '{pid}' FROM {sql.STATUS_STAGING}"
            )
        elif number == 0:
            ch.command(f"ALTER TABLE blocking_status DROP PARTITION ID '{pid}'")
    ch.command(f"TRUNCATE TABLE {sql.STATUS_STAGING}")


def events_written(ch: ClickHouse) -> None:
    """The pass's events are written: its hours need no computing again."""
    ch.command("TRUNCATE TABLE blocking_status_redo")


class _RowWriter:
    """Collects hourly rows as arrays and inserts them as one Arrow table per chunk."""

    def __init__(self, ch: ClickHouse, series: SeriesIndex, version: datetime):
        self.ch = ch
        self.series = series
        self.version = np.datetime64(version, "ms")
        self.parts: list[dict[str, np.ndarray]] = []

    def add(self, hour, alive, measured, shares, y, change, mem: SeriesState) -> None:
        self.parts.append(
            {
                "hour": np.full(len(alive), hour * 3600, np.int64),
                "series": alive,
                "measurements": measured,
                **shares,
                "blocked_share": y,
                "state": mem.state[alive].copy(),
                "change": change,
                "s_pos": mem.s_pos[alive].copy(),
                "s_neg": mem.s_neg[alive].copy(),
                "last_measured": mem.last_measured[alive] * 3600,
            }
        )

    def flush(self) -> None:
        if not self.parts:
            return
        columns = {name: np.concatenate([p[name] for p in self.parts]) for name in self.parts[0]}
        self.parts = []
        if not len(columns["hour"]):
            return
        alive = columns.pop("series")
        arrays = {
            "hour": pa.array(columns.pop("hour").astype("datetime64[s]")),
            "probe_cc": pa.array(self.series.cc[alive], pa.string()),
            "probe_asn": pa.array(self.series.asn[alive]),
            "domain": pa.array(self.series.domain[alive], pa.string()),
        }
        state = columns.pop("state")
        last_measured = columns.pop("last_measured")
        for name, values in columns.items():
            arrays[name] = pa.array(values)
        arrays["state"] = pa.array(state)
        arrays["last_measured"] = pa.array(last_measured.astype("datetime64[s]"))
        arrays["update_time"] = pa.array(np.full(len(alive), self.version))
        table = pa.table({name: arrays[name] for name in sql.STATUS_COLUMNS})
        self.ch.insert_arrow(sql.STATUS_STAGING, table)
