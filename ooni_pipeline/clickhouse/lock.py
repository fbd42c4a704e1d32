"""A lock held in ClickHouse itself: at most one updater run fills a staging table.

Dagster can start a second run of an updater while the first still waits for a
retry (retries back off for up to 40 minutes; ``citizenlab`` runs every 30), and on
a ClickHouse server two runs may execute at once. Both would fill and exchange the
same staging table. The lock lives where the tables are, so it holds whichever
hosts the runs execute on.

``CREATE TABLE`` without ``IF NOT EXISTS`` succeeds for exactly one caller, so the
lock is a small table named after what it guards, holding its owner's id. A lock
whose owner is gone (its run ended without releasing, the server restarted) is
taken over by renaming it away, which, too, succeeds for exactly one caller.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ooni_pipeline.clickhouse.connection import ClickHouse, ClickHouseError, quote_identifier

# A lock table whose owner row never arrived (a crash between CREATE and INSERT, or
# a server restart emptying the Memory table) is stale after this long.
OWNERLESS_GRACE_S = 60.0
# Embedded, the process holding the lock holds the whole data directory for as long
# as its connection is open, and a Memory table's rows die with their process: an
# ownerless lock seen from another connection is a crashed run's, unless a thread of
# this very process is between its CREATE and INSERT (milliseconds). A crash left
# every next run waiting the server's grace.
EMBEDDED_OWNERLESS_GRACE_S = 2.0
# An owner nobody here knows (another Dagster instance) is presumed working for this
# long: longer than an updater's run with all its retries (about 2.5 hours).
UNKNOWN_OWNER_STALE_S = 6 * 3600.0


class LockTimeoutError(RuntimeError):
    """The lock stayed with another live owner for longer than the wait allowed."""


def _lock_table(name: str) -> str:
    return f"_lock_{name}"


def _owner(ch: ClickHouse, table: str) -> tuple[str | None, float] | None:
    """(owner, seconds since it took the lock) or ``None`` if nobody holds it; the
    owner is ``None`` while its row is not written yet."""
    try:
        rows = ch.query_rows(
            f"SELECT owner, dateDiff('millisecond', since, now64(3)) / 1000 FROM {quote_identifier(table)}"
        )
    except ClickHouseError as exc:
        if "UNKNOWN_TABLE" in str(exc) or "does not exist" in str(exc):
            return None  # released meanwhile
        raise
    if not rows:
        return None, 0.0
    return str(rows[0][0]), max(0.0, float(rows[0][1]))


@contextmanager
def exclusive(
    ch: ClickHouse,
    name: str,
    owner: str,
    *,
    owner_alive: Callable[[str], bool | None],
    wait_s: float = 3 * 3600,
    poll_s: float = 2.0,
    log: logging.Logger | None = None,
) -> Iterator[None]:
    """Hold the lock ``name`` as ``owner`` for the block, waiting for a live holder.

    ``owner_alive(other)`` says whether another owner may still be working (for a
    Dagster run: its status is not final), or ``None`` if it does not know the
    owner; a dead owner's lock is taken over, an unknown owner's once it is older
    than ``UNKNOWN_OWNER_STALE_S``.
    """
    log = log or logging.getLogger(__name__)
    table = quote_identifier(_lock_table(name))
    deadline = time.monotonic() + wait_s
    announced: str | None = ""  # nothing announced yet
    ownerless_since: float | None = None
    while True:
        try:
            ch.command(f"CREATE TABLE {table} (owner String, since DateTime64(3)) ENGINE = Memory")
        except ClickHouseError as exc:
            if "already exists" not in str(exc).lower() and "TABLE_ALREADY_EXISTS" not in str(exc):
                raise
        else:
            ch.command(f"INSERT INTO {table} SELECT {{o:String}}, now64(3)", {"o": owner})
            break
        held = _owner(ch, _lock_table(name))
        if held is not None:
            holder, age = held
            if holder is None:
                ownerless_since = ownerless_since or time.monotonic()
                grace = EMBEDDED_OWNERLESS_GRACE_S if ch.embedded else OWNERLESS_GRACE_S
                stale = time.monotonic() - ownerless_since > grace
            else:
                ownerless_since = None
                alive = owner_alive(holder) if holder != owner else True
                stale = alive is False or (alive is None and age > UNKNOWN_OWNER_STALE_S)
            if stale:
                log.warning(f"lock {name}: its owner {holder or '(none)'} is gone; taking it over")
                aside = quote_identifier(f"_lock_stale_{uuid.uuid4().hex[:12]}")
                try:
                    ch.command(f"RENAME TABLE {table} TO {aside}")
                    ch.command(f"DROP TABLE IF EXISTS {aside} SYNC")
                except ClickHouseError:
                    pass  # another waiter took it over first
                continue
            if holder != announced:
                log.info(
                    f"lock {name} is held by {holder or 'another run'}; waiting for it to finish"
                )
                announced = holder
        if time.monotonic() >= deadline:
            raise LockTimeoutError(
                f"lock {name} is still held by {held[0] if held else 'another run'} after "
                f"{wait_s:.0f} s; nothing was changed"
            )
        time.sleep(poll_s)
    try:
        yield
    finally:
        # Only the owner's own lock is dropped (it may have been taken over meanwhile).
        try:
            if ch.scalar(f"SELECT any(owner) FROM {table}") == owner:
                ch.command(f"DROP TABLE IF EXISTS {table} SYNC")
        except ClickHouseError:
            log.warning(f"lock {name} was gone before its release")
