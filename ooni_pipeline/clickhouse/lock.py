"""A lock held in ClickHouse itself: at most one updater run fills a staging table.

Dagster can start a second run of an updater while the first still waits for a
retry (retries back off for up to 40 minutes; ``citizenlab`` runs every 30), and on
a ClickHouse server two runs may execute at once. Both would fill and exchange the
same staging table. The lock lives where the tables are, so it holds whichever
hosts the runs execute on.

``CREATE TABLE`` without ``IF NOT EXISTS`` succeeds for exactly one caller, so the
lock is a small table named after what it guards. Its comment, written by the very
statement that creates it, names its owner and a token unique to this holding; a
Memory row repeats the owner (it dies with an embedded process, which tells a crashed
embedded run's lock at once).

A lock whose owner is gone (its run ended without releasing, its worker was killed
and run monitoring marked it failed) is taken over in one atomic step: the lock is
renamed to a tombstone named after the token that was judged dead. A second waiter
that judged the same holding dead renames to the same name and fails, because the
tombstone exists (tombstones are kept a day), so it can never rename away the lock
the first waiter has taken meanwhile.

The lock is a table of the database ``OONI_CLICKHOUSE_URL`` names, on the node it
names: every run of a deployment uses the same URL, so every run sees it. On a
cluster that URL must name one node, not a load balancer across replicas (a Memory
table is local to its node).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
# Tombstones of taken-over locks are dropped once older than this: far longer than a
# waiter takes between reading a lock's owner and renaming it.
TOMBSTONE_KEEP_S = 24 * 3600.0
_OWNER = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


class LockTimeoutError(RuntimeError):
    """The lock stayed with another live owner for longer than the wait allowed."""


def _lock_table(name: str) -> str:
    return f"_lock_{name}"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return re.sub(r"[^0-9a-f]", "", f.read())[:16] or "0"
    except OSError:
        return "0"


def this_worker() -> str:
    """Where this process runs, as ``host:boot-id:pid-namespace:pid``: a lock taken by
    a process that no longer exists here is dead, whatever Dagster's record says (a
    worker killed with its code server leaves its run STARTED, and the default run
    launcher cannot tell run monitoring it died). The boot id tells two machines
    apart even with one hostname and the initial pid namespace (whose inode is the
    same on every Linux host); the namespace, two containers of one machine."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
    try:
        namespace = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or "0"
    except OSError:
        namespace = "0"
    return f"{host}:{_boot_id()}:{namespace}:{os.getpid()}"


def worker_gone(worker: str) -> bool:
    """Whether ``worker`` (``this_worker()`` of a holder) is a process of this machine
    and pid namespace that no longer exists; ``False`` when that cannot be told here."""
    place, _, pid = worker.rpartition(":")
    if not pid.isdigit() or place != this_worker().rpartition(":")[0] or place.count(":") != 2:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class Holding:
    """Who holds a lock: ``owner`` is ``None`` while (embedded) its Memory row is
    missing, written a moment after the table and gone with the process that wrote it.
    ``changing``: the comment and the row were read from two different holdings (one
    released, the next taken between the two reads); nothing may be judged from it."""

    owner: str | None
    token: str
    age_s: float
    worker: str
    changing: bool = False


def _tombstone(name: str, token: str) -> str:
    return f"_lock_dead_{name}_{token}"


def _comment_fields(comment: str) -> list[str]:
    """owner, token, time taken, worker and, on a tombstone, time it died (``''`` each
    when absent: a lock of an earlier version has no comment)."""
    return (comment.split(" ") + ["", "", "0", "", ""])[:5]


def _holding(ch: ClickHouse, table: str) -> Holding | None:
    """The lock's holding, or ``None`` if nobody holds it."""
    rows = ch.query_rows(
        "SELECT comment FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
        {"t": table},
    )
    if not rows:
        return None
    owner, token, taken, worker, _ = _comment_fields(str(rows[0][0]))
    age = "dateDiff('millisecond', since, now64(3)) / 1000"
    legacy = False
    try:
        try:
            held = ch.query_rows(f"SELECT owner, token, {age} FROM {quote_identifier(table)}")
        except ClickHouseError as exc:
            if "token" not in str(exc):
                raise
            # A lock of an earlier version: no token in its row to compare.
            legacy = True
            held = ch.query_rows(f"SELECT owner, '', {age} FROM {quote_identifier(table)}")
    except ClickHouseError as exc:
        if "UNKNOWN_TABLE" in str(exc) or "does not exist" in str(exc):
            return None  # released meanwhile
        raise
    if held:
        row_owner, row_token, row_age = str(held[0][0]), str(held[0][1]), float(held[0][2])
        changing = not legacy and row_token != token
        return Holding(row_owner, token, max(0.0, row_age), worker, changing=changing)
    age_s = max(0.0, time.time() - float(taken or 0))
    # Embedded, a missing row is a dead process's; on a server, a restart's (the
    # comment still names the owner).
    return Holding(None if ch.embedded else owner or None, token, age_s, worker)


def _bury(ch: ClickHouse, name: str, tombstone: str) -> None:
    """Date a tombstone just made (its comment keeps the dead holding's, plus when it
    died), then drop those dead for longer than ``TOMBSTONE_KEEP_S``. A tombstone
    without a date (its waiter died between the two steps) is kept."""
    rows = ch.query_rows(
        "SELECT name, comment FROM system.tables WHERE database = currentDatabase() "
        "AND startsWith(name, {prefix:String})",
        {"prefix": _tombstone(name, "")},
    )
    now = time.time()
    for table, comment in rows:
        table, comment = str(table), str(comment)
        owner, token, taken, worker, died = _comment_fields(comment)
        if table == tombstone:
            dated = f"{owner} {token} {taken} {worker} {now:.3f}"
            if re.fullmatch(r"[A-Za-z0-9_.:\- ]*", dated):
                ch.command(f"ALTER TABLE {quote_identifier(table)} MODIFY COMMENT '{dated}'")
            continue
        if re.fullmatch(r"\d+(\.\d+)?", died) and now - float(died) > TOMBSTONE_KEEP_S:
            ch.command(f"DROP TABLE IF EXISTS {quote_identifier(table)} SYNC")


@contextmanager
def exclusive(
    ch: ClickHouse,
    name: str,
    owner: str,
    *,
    owner_alive: Callable[[str], bool | None],
    on_dead_worker: Callable[[str], None] | None = None,
    wait_s: float = 3 * 3600,
    poll_s: float = 2.0,
    log: logging.Logger | None = None,
) -> Iterator[None]:
    """Hold the lock ``name`` as ``owner`` for the block, waiting for a live holder.

    ``owner_alive(other)`` says whether another owner may still be working (for a
    Dagster run: its status is not final), or ``None`` if it does not know the
    owner; a dead owner's lock is taken over, an unknown owner's once it is older
    than ``UNKNOWN_OWNER_STALE_S``. A holder whose worker process is gone from this
    host is dead whatever ``owner_alive`` says; ``on_dead_worker(owner)`` is told
    (to mark its run failed).
    """
    log = log or logging.getLogger(__name__)
    if not _OWNER.fullmatch(owner):
        raise ValueError("a lock owner is a run id: letters, digits, '_', '.', ':', '-'")
    table = quote_identifier(_lock_table(name))
    token = uuid.uuid4().hex[:16]
    deadline = time.monotonic() + wait_s
    announced: str | None = ""  # nothing announced yet
    ownerless_since: float | None = None
    held: Holding | None = None
    while True:
        try:
            ch.command(
                f"CREATE TABLE {table} (owner String, token String, since DateTime64(3)) "
                f"ENGINE = Memory COMMENT '{owner} {token} {time.time():.3f} {this_worker()}'"
            )
        except ClickHouseError as exc:
            if "already exists" not in str(exc).lower() and "TABLE_ALREADY_EXISTS" not in str(exc):
                raise
        else:
            ch.command(
                f"INSERT INTO {table} SELECT {{o:String}}, {{t:String}}, now64(3)",
                {"o": owner, "t": token},
            )
            break
        held = _holding(ch, _lock_table(name))
        if held is not None:
            holder, held_token, age = held.owner, held.token, held.age_s
            if held.changing:
                stale = False  # read across a release and a new taking: look again
            elif holder is None:
                ownerless_since = ownerless_since or time.monotonic()
                grace = EMBEDDED_OWNERLESS_GRACE_S if ch.embedded else OWNERLESS_GRACE_S
                stale = time.monotonic() - ownerless_since > grace
            elif holder != owner and worker_gone(held.worker):
                ownerless_since = None
                stale = True
                if on_dead_worker is not None:
                    on_dead_worker(holder)
            else:
                ownerless_since = None
                alive = owner_alive(holder) if holder != owner else True
                stale = alive is False or (alive is None and age > UNKNOWN_OWNER_STALE_S)
            if stale:
                log.warning(f"lock {name}: its owner {holder or '(none)'} is gone; taking it over")
                tombstone = _tombstone(name, held_token)
                try:
                    # Fails if another waiter renamed this very holding first (the
                    # tombstone exists) or the lock is gone: either way, start again.
                    ch.command(f"RENAME TABLE {table} TO {quote_identifier(tombstone)}")
                except ClickHouseError:
                    pass
                else:
                    _bury(ch, name, tombstone)
                continue
            if holder != announced:
                log.info(
                    f"lock {name} is held by {holder or 'another run'}; waiting for it to finish"
                )
                announced = holder
        if time.monotonic() >= deadline:
            raise LockTimeoutError(
                f"lock {name} is still held by {held.owner if held else 'another run'} after "
                f"{wait_s:.0f} s; nothing was changed"
            )
        time.sleep(poll_s)
    try:
        yield
    finally:
        # Only this holding's own lock is dropped (it may have been taken over meanwhile).
        try:
            current = _holding(ch, _lock_table(name))
            if current is not None and current.token == token:
                ch.command(f"DROP TABLE IF EXISTS {table} SYNC")
            else:
                log.warning(f"lock {name} was taken over before its release")
        except ClickHouseError:
            log.warning(f"lock {name} was gone before its release")
