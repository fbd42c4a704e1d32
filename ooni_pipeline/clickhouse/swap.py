"""Atomic table replacement, the one mechanism every updater uses.

Fill a staging table, check it, then ``EXCHANGE TABLES`` it with the live table in
one atomic rename. Any failure before the exchange leaves the live table exactly as
it was; after the exchange the staging table holds the previous content, which
callers may diff against.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ooni_pipeline.clickhouse.connection import ClickHouse, quote_identifier
from ooni_pipeline.clickhouse.schema import ensure_tables


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
) -> ReplaceResult:
    """Fill ``staging`` through ``fill(ch, staging)``, check it, swap it with ``live``.

    ``validate`` may raise to refuse the new content. Errors raised by ``fill`` and
    ``validate`` propagate as ``TableUpdateError`` naming the step.
    """
    quote_identifier(live)
    quote_identifier(staging)
    ensure_tables(ch, live, staging)
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
    fill_s = time.monotonic() - start
    start = time.monotonic()
    ch.command(f"EXCHANGE TABLES {quote_identifier(staging)} AND {quote_identifier(live)}")
    return ReplaceResult(
        rows=rows, previous_rows=previous_rows, fill_s=fill_s, swap_s=time.monotonic() - start
    )
