"""Atomic replacement of a table's data, the one mechanism every updater uses.

Fill a staging twin of the live table (``schema.staging_twin``), check it, then make
its rows the live table's in one atomic step. The live table's definition is never
touched: it may be the operator's (another ORDER BY, settings, columns the project
does not know, a ``Replicated*`` engine on a cluster).

- MergeTree family: ``ALTER TABLE live REPLACE PARTITION … FROM staging``. ClickHouse
  copies the staging parts by hard links and swaps them in atomically per partition
  (ClickHouse docs, "Manipulating Partitions"); on a ``Replicated*`` live table the
  ALTER goes through the replication log, so every replica gets the new data. An
  unpartitioned table (all of OONI's) is one partition: one atomic step. A
  partitioned one is replaced partition by partition, each atomically.
- Any other engine (``EmbeddedRocksDB``, which is never replicated): the twin is an
  exact copy of the live definition, so ``EXCHANGE TABLES`` swaps data, and the
  definition the live name ends up with is the one it had.

Any failure before that step leaves the live table exactly as it was. A caller that
wants to compare old and new does so in ``before_swap`` (live is old, staging new).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from ooni_pipeline.clickhouse.connection import ClickHouse, quote_identifier
from ooni_pipeline.clickhouse.schema import (
    ensure_updater_table,
    staging_twin,
)


class TableUpdateError(RuntimeError):
    """An update failed before the swap: the live table is unchanged."""


@dataclass(frozen=True)
class RowBounds:
    """Sanity bounds on a table's new size, exclusive at both ends."""

    more_than: int
    fewer_than: int

    def check(self, rows: int, what: str) -> None:
        if not self.more_than < rows < self.fewer_than:
            raise TableUpdateError(
                f"{what}: {rows} rows is outside the sanity bounds "
                f"(more than {self.more_than}, fewer than {self.fewer_than}); nothing was swapped"
            )


@dataclass(frozen=True)
class ReplaceResult:
    rows: int
    previous_rows: int
    fill_s: float
    swap_s: float


def replace_table(
    ch: ClickHouse,
    *,
    live: str,
    staging: str,
    fill: Callable[[ClickHouse, str], None],
    bounds: RowBounds | None = None,
    validate: Callable[[ClickHouse, str], None] | None = None,
    before_swap: Callable[[ClickHouse, str], None] | None = None,
) -> ReplaceResult:
    """Fill ``staging`` through ``fill(ch, staging)``, check it, make it ``live``'s data.

    ``validate`` may raise to refuse the new content. Errors raised by ``fill`` and
    ``validate`` propagate as ``TableUpdateError`` naming the step. ``before_swap``
    runs last before the swap (e.g. to compare old and new).
    """
    quote_identifier(live)
    quote_identifier(staging)
    ensure_updater_table(ch, live)
    shape = staging_twin(ch, live, staging)
    previous_rows = ch.count(live)
    start = time.monotonic()
    ch.command(f"TRUNCATE TABLE {quote_identifier(staging)}")
    try:
        fill(ch, staging)
    except Exception as exc:
        raise TableUpdateError(f"filling {staging} failed, {live} left unchanged: {exc}") from exc
    rows = ch.count(staging)
    if bounds is not None:
        bounds.check(rows, staging)
    if validate is not None:
        try:
            validate(ch, staging)
        except Exception as exc:
            raise TableUpdateError(
                f"validating {staging} failed, {live} left unchanged: {exc}"
            ) from exc
    if before_swap is not None:
        before_swap(ch, staging)
    fill_s = time.monotonic() - start
    start = time.monotonic()
    if shape.merge_tree:
        _replace_partitions(ch, live, staging)
    else:
        ch.command(f"EXCHANGE TABLES {quote_identifier(staging)} AND {quote_identifier(live)}")
    return ReplaceResult(
        rows=rows, previous_rows=previous_rows, fill_s=fill_s, swap_s=time.monotonic() - start
    )


_PARTS_SQL = (
    "SELECT table, partition_id FROM system.parts WHERE database = currentDatabase() "
    "AND table IN ({live:String}, {staging:String}) AND active GROUP BY table, partition_id"
)
# What a partition id looks like (a hash, a number, a date, ``all``); anything else
# is refused rather than written into a statement.
_PARTITION_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def _replace_partitions(ch: ClickHouse, live: str, staging: str) -> None:
    """Every partition of ``live`` gets ``staging``'s parts of it; one staging has no
    part of is dropped (newer servers refuse to replace from an empty source).

    OONI's tables are unpartitioned: one statement, atomic. An operator's partitioned
    table is replaced partition by partition, each atomically: the new partitions come
    in first, then the ones the new data lacks leave, so a failure half-way leaves
    every row of the new data that is in, and old rows only where new ones are not
    yet; the next run completes it."""
    parts = ch.query_rows(_PARTS_SQL, {"live": live, "staging": staging})
    staged = sorted({str(pid) for table, pid in parts if table == staging})
    gone = sorted({str(pid) for _, pid in parts} - set(staged))
    statements = [
        f"ALTER TABLE {quote_identifier(live)} REPLACE PARTITION ID '{pid}' "
        f"FROM {quote_identifier(staging)}"
        for pid in staged
    ] + [f"ALTER TABLE {quote_identifier(live)} DROP PARTITION ID '{pid}'" for pid in gone]
    for pid in (*staged, *gone):
        if not _PARTITION_ID.fullmatch(pid):
            raise TableUpdateError(f"unexpected partition id in {live} or {staging}")
    for done, statement in enumerate(statements):
        try:
            ch.command(statement)
        except Exception as exc:
            state = (
                "left unchanged"
                if done == 0
                else (
                    f"partly replaced ({done} of {len(statements)} partitions); the next run "
                    "completes it"
                )
            )
            raise TableUpdateError(
                f"replacing {live}'s partitions failed, {live} {state}: {exc}"
            ) from exc
