"""The detector's state machine: OONI's state-aware two-sided CUSUM, vectorised.

Baseline: ooni/data ``oonipipeline/analysis/detector.py`` (``CusumDetector``, in
OONI's hourly Airflow DAG), itself Basseville & Nikiforov 1993, §2.2.5. For each
series (probe_cc, probe_asn, domain) and each hour with measurements, ``y`` is the
hour's share of blocked measurements:

- OK: ``s_pos = max(0, s_pos + y - mu0 - v/2)``; past ``h`` the series turns
  BLOCKED (a +1 change). ``s_neg`` is held at 0.
- BLOCKED: ``s_neg = max(0, s_neg - (y - mu1) - v/2)``; past ``h`` it turns OK
  (a -1 change). ``s_pos`` is held at 0.
- UNKNOWN (first seen, or forgotten): both run; the first crossing sets the state
  silently, as OONI's does: a block older than the series is not news.
- ``v = mu1 - mu0``, ``h = edd * v / 2``; both accumulators reset at a change.
- Across a silence longer than 24 hours both accumulators decay with a half-life of
  ``gap_halflife_hours`` (OONI's ``_decay``), and a series silent longer than
  ``forget_after_hours`` starts over UNKNOWN (OONI reads back only states of the
  last 10 days, ``get_cusum_map(freshness=10 days)``).
- An hour without measurements changes nothing (OONI's ``w == 0``).

OONI's defaults are kept (mu0 = 0, mu1 = 0.7, edd = 10 as ``run_detector`` passes,
48 h half-life): the tests' timelines (onset, recovery, flapping, gaps, shutdown)
give the expected events with them, so there was no measured reason to change them.
OONI's ``last_change`` guard is left out: with a reset at every change a series
cannot cross twice in the same direction without the opposite change between.

Everything here works on arrays holding every series at once: one step per hour,
no Python loop over series or rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

UNKNOWN, OK, BLOCKED = 0, 1, 2
STATE_NAMES = ("unknown", "ok", "blocked")
NEVER = np.int64(-(2**62))  # last_measured of a series with no measurement yet


@dataclass(frozen=True)
class CusumParams:
    """The detector's parameters (recorded in the asset's metadata)."""

    mu0: float = 0.0
    mu1: float = 0.7
    edd: float = 10.0
    gap_halflife_hours: float = 48.0
    decay_after_hours: float = 24.0
    forget_after_hours: int = 240

    @property
    def v(self) -> float:
        return self.mu1 - self.mu0

    @property
    def h(self) -> float:
        return self.edd * self.v / 2.0

    def as_metadata(self) -> dict[str, float]:
        return {**asdict(self), "v": self.v, "h": self.h}


@dataclass
class SeriesState:
    """The detector's memory of every series, as parallel arrays.

    ``last_measured`` is in hours since the epoch (``NEVER`` when unknown).
    """

    state: np.ndarray  # int8
    s_pos: np.ndarray  # float64
    s_neg: np.ndarray  # float64
    last_measured: np.ndarray  # int64

    @classmethod
    def empty(cls, n: int) -> SeriesState:
        return cls(
            np.zeros(n, np.int8),
            np.zeros(n, np.float64),
            np.zeros(n, np.float64),
            np.full(n, NEVER, np.int64),
        )

    def grown(self, n: int) -> SeriesState:
        """These series followed by new, never measured ones, up to ``n``."""
        extra = SeriesState.empty(n - len(self.state))
        return SeriesState(
            np.concatenate([self.state, extra.state]),
            np.concatenate([self.s_pos, extra.s_pos]),
            np.concatenate([self.s_neg, extra.s_neg]),
            np.concatenate([self.last_measured, extra.last_measured]),
        )

    def copy(self) -> SeriesState:
        return SeriesState(
            self.state.copy(), self.s_pos.copy(), self.s_neg.copy(), self.last_measured.copy()
        )


def step(
    mem: SeriesState,
    hour: int,
    index: np.ndarray,
    y: np.ndarray,
    params: CusumParams,
) -> np.ndarray:
    """Advance the series ``index`` (those measured in ``hour``) by one observation
    ``y`` each, in place; return the change of each of them (+1, -1 or 0).

    Series not in ``index`` keep their state: an hour without measurements is no
    evidence either way.
    """
    state = mem.state[index]
    s_pos = mem.s_pos[index]
    s_neg = mem.s_neg[index]
    last = mem.last_measured[index]

    gap = np.where(last == NEVER, 0, hour - last).astype(np.float64)
    forgotten = gap > params.forget_after_hours
    decay = np.where(gap > params.decay_after_hours, 0.5 ** (gap / params.gap_halflife_hours), 1.0)
    state = np.where(forgotten, UNKNOWN, state).astype(np.int8)
    s_pos = np.where(forgotten, 0.0, s_pos * decay)
    s_neg = np.where(forgotten, 0.0, s_neg * decay)

    half = params.v / 2.0
    up = np.maximum(0.0, s_pos + (y - params.mu0) - half)
    down = np.maximum(0.0, s_neg - (y - params.mu1) - half)
    is_ok, is_blocked = state == OK, state == BLOCKED
    s_pos = np.where(is_blocked, 0.0, up)
    s_neg = np.where(is_ok, 0.0, down)

    goes_blocked = (s_pos > params.h) & ~is_blocked
    goes_ok = (s_neg > params.h) & ~is_ok & ~goes_blocked
    change = np.zeros(len(index), np.int8)
    change[goes_blocked & is_ok] = 1
    change[goes_ok & is_blocked] = -1
    state[goes_blocked] = BLOCKED
    state[goes_ok] = OK
    crossed = goes_blocked | goes_ok
    s_pos[crossed] = 0.0
    s_neg[crossed] = 0.0

    mem.state[index] = state
    mem.s_pos[index] = s_pos
    mem.s_neg[index] = s_neg
    mem.last_measured[index] = hour
    return change


def remembered(mem: SeriesState, hour: int, params: CusumParams) -> np.ndarray:
    """Mask of the series still remembered at ``hour``: measured within
    ``forget_after_hours``. Only those are carried into the next hour's rows."""
    return (mem.last_measured != NEVER) & (hour - mem.last_measured <= params.forget_after_hours)
