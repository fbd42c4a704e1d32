"""Whether a chunk changed since its object was written, decided from its parts.

Fingerprinting a month reads every row of it (``FINAL``), at a cost close to
exporting it, so a rerun first asks ``system.parts``, in two steps:

1. **The same parts** (O(parts), no row read). Parts are immutable and their names
   unique: a chunk whose parts (name, rows, hash of their files) and table (its
   identity and definition) are those its object was read from holds the same rows.
   The manifest's ``parts`` (``PartsState.signature``).
2. **Parts moved by merges only** (O(parts), plus the month's key column counted).
   Every insert takes a block number and every mutation (``ALTER UPDATE``/``DELETE``,
   a lightweight ``DELETE``) a mutation number, from one increasing sequence per
   partition; a part ``<partition>_<min block>_<max block>_<level>[_<mutation>]``
   holds rows of those blocks only, and a merge makes one part covering its sources'
   blocks, carrying their highest mutation. The manifest's ``blocks`` records, when
   the object was read, the block ranges its partitions' parts covered, the highest
   mutation number then (none pending), and the month's physical rows (``count()``
   without ``FINAL``). A month whose rows now lie only in parts within those ranges,
   mutated by no later mutation, gained and changed no row since (a row inserted
   since has a block outside them, a mutation since a higher number); with as many
   physical rows it lost none either (a ``DROP PART``, a lightweight delete, a merge
   dropping a replaced version or collapsing rows all lower the count; a merge can
   cover a dropped part's blocks, which is why the count is needed). Same rows, so
   the same ``FINAL`` rows: the object stands. When the count moved (a merge dropped
   duplicates), the row fingerprint decides.

Block numbers are unique only while the table stays loaded: a MergeTree that is
not replicated numbers them on from the highest part it finds when it loads (a
server's start, ``ATTACH TABLE``, every chdb process), so a table emptied, loaded
again and filled anew has the same part names, block ranges and counts with other
rows. The proof therefore also reads the table's insertion-time column in the same
count: every row of the month inserted before the record's snapshot
(``inserted_by``: a row of a block number used again is newer), and the sum of
their insertion times' hashes as recorded (``inserted_hash``: rows copied from
another table, ``ATTACH PARTITION FROM`` after such a load, were inserted at other
instants).

The second step is not taken for tables whose merges can change rows otherwise
(``TTL``; lightweight ``UPDATE``'s patch parts, which merges apply without a new
mutation number: tables with ``enable_block_number_column``), while a mutation is
pending (it may be applied to rows as they are read; and a record is made only when
none was, so that every mutation it does not count comes after it), nor for a table
without a UUID to tell it from one dropped and created again under the same name
(block numbers start again at 1), nor for one without an insertion-time column
(see above), nor where ``FINAL`` may fold rows of different months (a version of a
row in February replaces, or stops replacing, its version in January without a
row of January moving): engines read with ``FINAL`` whose sorting key lacks the
month column.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

from ooni_pipeline.backup.plan import (
    BackupTable,
    Chunk,
    Source,
    insertion_time_column,
    list_chunks,
    needs_final,
)
from ooni_pipeline.clickhouse import ClickHouse, quote_identifier

_NO_UUID = "00000000-0000-0000-0000-000000000000"
# A table's data directory named by its UUID (Atomic databases, chdb's default one).
_UUID_PATH = re.compile(r"/store/[0-9a-f]{3}/[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}/?$")
_TTL = re.compile(r"\bTTL\b", re.IGNORECASE)

Coverage = dict[str, dict[str, Any]]  # partition -> {"blocks": [[min, max], ...], "mutation": n}


class PartRows(NamedTuple):
    """A chunk's physical rows in one part, and what their insertion times say."""

    rows: int
    newest_ms: int | None  # the newest row's insertion time (Unix ms); None if not read
    inserted_hash: int  # the sum of their insertion times' hashes (mod 2^64); 0 if not read


RowsByPart = dict[tuple[str, str], PartRows]  # (partition, part) -> the chunk's rows in it


@dataclass(frozen=True)
class PartsState:
    """The active parts that may hold a chunk's rows, in a form cheap to compare.

    Parts are immutable and their names unique, so an equal ``signature`` means the
    chunk's rows are the ones read last time: deciding "unchanged" costs a look at
    ``system.parts`` and the primary index (O(parts + marks)), not a scan of the rows.
    """

    signature: str
    newest_s: int  # the latest part's modification time (Unix seconds, engine clock)
    # What a ``blocks`` record of these parts holds, when the table allows one. Not
    # compared: a part of another month changing leaves this chunk's parts as they were.
    coverage: Coverage | None = field(default=None, compare=False)
    table: str | None = field(default=None, compare=False)

    def settled_before(self, source: Source) -> bool:
        """Whether every row of these parts is surely inside ``source``'s snapshot: a
        row's insertion time precedes its part's modification time (to the second)."""
        if not (source.snapshot_column and source.snapshot_time):
            return True
        snapshot = datetime.strptime(source.snapshot_time[:19], "%Y-%m-%d %H:%M:%S")
        return self.newest_s + 1 <= int(snapshot.replace(tzinfo=timezone.utc).timestamp())


def inside_snapshot(ch: ClickHouse, chunk: Chunk, state: PartsState, source: Source) -> bool:
    """Whether the chunk's parts hold no row newer than ``source``'s snapshot, so their
    digest may stand for the fingerprinted content. Parts older than the snapshot
    settle it for free; fresher ones (a merge a minute ago) by counting the newer rows
    (two columns, no ``FINAL``), once, after a fingerprint was paid anyway."""
    if state.settled_before(source):
        return True
    where, params = chunk.where()
    column = quote_identifier(source.snapshot_column or "")
    newer = ch.scalar(
        f"SELECT count() FROM {quote_identifier(source.table)} WHERE {where} "
        f"AND {column} > toDateTime64({{snapshot_time:String}}, 3, 'UTC')",
        {**params, "snapshot_time": source.snapshot_time},
    )
    return int(newer) == 0


@dataclass(frozen=True)
class _Part:
    name: str
    rows: int
    files_hash: str
    modified_s: int
    partition: str
    min_block: int
    max_block: int
    key_min: int | None = None  # the month column's first and last value (Unix s)
    key_max: int | None = None


class TableParts:
    """A table's active parts, read once; ``state(chunk)`` selects a chunk's.

    A month's parts are those whose range of the month column (first and last value
    of the primary index, when the column leads the sorting key) meets the month;
    otherwise every part of the table counts, which is safe, only less often equal.
    Tables without parts (``EmbeddedRocksDB``...) have no state: always fingerprinted.
    ``provable``: whether block records apply (see the module's docstring).
    """

    def __init__(self, ch: ClickHouse, spec: BackupTable):
        self.spec = spec
        self.parts: list[_Part] | None = None
        self.mutations: dict[str, int] | None = None
        self.provable = False
        self.inserted: str | None = None  # the insertion-time column, where provable
        engine, sorting_key, uuid, paths, definition = ch.query_rows(
            "SELECT engine, sorting_key, toString(uuid), data_paths, create_table_query "
            "FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
            {"t": spec.table},
        )[0]
        identity = (
            str(uuid)
            if str(uuid) != _NO_UUID
            else next((str(p) for p in paths if _UUID_PATH.search(str(p))), None)
        )
        # Its identity and definition: a column added (metadata only: no part changes)
        # changes SELECT *'s rows, a table created again under the name changes its rows.
        self.table = hashlib.sha256(f"{identity}\n{definition}".encode()).hexdigest()[:32]
        if not str(engine).endswith("MergeTree"):
            return
        sorting = [c.strip() for c in str(sorting_key).split(",")]
        provable = (
            identity is not None
            and (
                not needs_final(str(engine))
                or not spec.month_column
                or spec.month_column in sorting
            )
            and not _TTL.search(str(definition))
            and "enable_block_number_column" not in str(definition)
            and str(
                ch.scalar(
                    "SELECT value FROM system.merge_tree_settings "
                    "WHERE name = 'enable_block_number_column'"
                )
                or "0"
            )
            in ("0", "false")
        )
        self.inserted = insertion_time_column(ch, spec.table) if provable else None
        # Read before the parts: a mutation begun after this has a higher number.
        self.mutations = mutation_numbers(ch, spec.table) if self.inserted else None
        self.provable = self.mutations is not None
        ranges: dict[str, tuple[int, int | None]] = {}
        leading = sorting[0]
        if spec.month_column and leading == spec.month_column:
            column = quote_identifier(spec.month_column)
            try:
                ranges = {
                    str(name): (int(low), int(high) if final_mark else None)
                    for name, low, high, final_mark in ch.query_rows(
                        f"SELECT part_name, toUnixTimestamp(min({column})), toUnixTimestamp(max({column})), "
                        "countIf(rows_in_granule = 0) > 0 "
                        "FROM mergeTreeIndex(currentDatabase(), {t:String}) GROUP BY part_name",
                        {"t": spec.table},
                    )
                }
            except Exception:  # a server older than mergeTreeIndex (24.4): every part counts
                ranges = {}
        self.parts = [
            _Part(
                str(name),
                int(rows),
                str(files_hash),
                int(modified),
                str(partition),
                int(low),
                int(high),
                *ranges.get(str(name), (None, None)),
            )
            for name, rows, files_hash, modified, partition, low, high in ch.query_rows(
                "SELECT name, rows, hash_of_all_files, toUnixTimestamp(modification_time), "
                "partition_id, min_block_number, max_block_number "
                "FROM system.parts WHERE database = currentDatabase() AND table = {t:String} "
                "AND active",
                {"t": spec.table},
            )
        ]

    def state(self, chunk: Chunk) -> PartsState | None:
        if self.parts is None:
            return None
        parts = [p for p in self.parts if p.rows > 0 and _may_hold(p, chunk)]
        text = "\n".join([self.table, *sorted(f"{p.name}:{p.rows}:{p.files_hash}" for p in parts)])
        return PartsState(
            hashlib.sha256(text.encode()).hexdigest()[:32],
            max((p.modified_s for p in parts), default=0),
            self.coverage({p.partition for p in parts}) if self.provable else None,
            self.table if self.provable else None,
        )

    def months(self) -> list[str] | None:
        """The months (``YYYYMM``) that the key ranges of the parts holding rows meet,
        a superset of the months with rows, read from the primary index alone; None
        when some part's range is unknown (no index read, no final mark), or the
        table is not backed up by month."""
        if self.parts is None or not self.spec.month_column:
            return None
        found: set[str] = set()
        for part in self.parts:
            if part.rows == 0:
                continue
            if part.key_min is None or part.key_max is None:
                return None
            month = datetime.fromtimestamp(part.key_min, timezone.utc).replace(day=1)
            last = datetime.fromtimestamp(part.key_max, timezone.utc)
            while month <= last:
                found.add(month.strftime("%Y%m"))
                month = (month + timedelta(days=32)).replace(day=1)
        return sorted(found)

    def coverage(self, partitions: set[str]) -> Coverage:
        """Per partition: the block ranges its active parts cover (empty ones too), and
        the highest mutation number before they were read."""
        found: Coverage = {}
        mutations = self.mutations or {}
        for partition in sorted(partitions):
            parts = sorted(
                (p for p in self.parts or () if p.partition == partition),
                key=lambda p: p.min_block,
            )
            blocks: list[list[int]] = []
            for part in parts:
                if blocks and part.min_block <= blocks[-1][1] + 1:
                    blocks[-1][1] = max(blocks[-1][1], part.max_block)
                else:
                    blocks.append([part.min_block, part.max_block])
            mutation = max(mutations.get(partition, 0), mutations.get("", 0))
            found[partition] = {"blocks": blocks, "mutation": mutation}
        return found


def _may_hold(part: _Part, chunk: Chunk) -> bool:
    if not chunk.month or part.key_min is None:
        return True
    start, end = chunk.bounds()
    return part.key_min < end and (part.key_max is None or part.key_max >= start)


def parts_state(ch: ClickHouse, chunk: Chunk) -> PartsState | None:
    """The chunk's parts now (see ``TableParts``)."""
    return TableParts(ch, chunk.spec).state(chunk)


def rows_by_part(ch: ClickHouse, chunk: Chunk, inserted: str | None = None) -> RowsByPart:
    """The chunk's physical rows (no ``FINAL``, every version) in each part, and what
    their ``inserted`` times say (the insertion-time column, if given), as one
    query sees them: the parts come from the same snapshot as the counts. Reads the
    month column (and ``inserted``) alone, only its granules in the month."""
    where, params = chunk.where()
    column = quote_identifier(inserted) if inserted else ""
    times = (
        f"toUnixTimestamp64Milli(toDateTime64(max({column}), 3, 'UTC')), sum(cityHash64({column}))"
        if inserted
        else "NULL, 0"
    )
    return {
        (str(partition), str(part)): PartRows(
            int(rows), None if last is None else int(last), int(hashes)
        )
        for part, partition, rows, last, hashes in ch.query_rows(  # grouped by the part alone
            f"SELECT _part, any(_partition_id), count(), {times} "
            f"FROM {quote_identifier(chunk.spec.table)} WHERE {where} GROUP BY _part",
            params,
        )
    }


def mutation_numbers(ch: ClickHouse, table: str) -> dict[str, int] | None:
    """The highest mutation number of each partition (``""``: every partition, as a
    table that is not replicated numbers them), or None while a mutation is pending."""
    found: dict[str, int] = {}
    for partitions, numbers, done in ch.query_rows(
        "SELECT block_numbers.partition_id, block_numbers.number, is_done FROM system.mutations "
        "WHERE database = currentDatabase() AND table = {t:String}",
        {"t": table},
    ):
        if not done:
            return None
        for partition, number in zip(partitions, numbers, strict=True):
            found[str(partition)] = max(found.get(str(partition), 0), int(number))
    return found


def blocks_record(
    state: PartsState, rows: RowsByPart, inserted_by: str | None
) -> dict[str, Any] | None:
    """The manifest's ``blocks`` for an object read from ``state``'s parts, whose
    physical rows were ``rows``, every one inserted by ``inserted_by`` (its snapshot,
    ``YYYY-MM-DD hh:mm:ss.fff`` UTC); None if the table allows no such record.
    ``rows`` must have their insertion times read (``rows_by_part``'s ``inserted``).

    Sound when ``state`` was read before the rows were counted, those rows are the
    object's (the same parts, every one inside its snapshot: the callers see to it)."""
    if state.table is None or state.coverage is None or not inserted_by:
        return None
    return {
        "table": state.table,
        "rows": sum(r.rows for r in rows.values()),
        "inserted_by": inserted_by,
        "inserted_hash": _hash_text(rows),
        "partitions": state.coverage,
    }


def _hash_text(rows: RowsByPart) -> str:
    return f"{sum(r.inserted_hash for r in rows.values()) % 2**64:016x}"


def _unix_ms(text: str) -> int:
    """``YYYY-MM-DD hh:mm:ss[.fff]`` (UTC) in Unix milliseconds."""
    whole, _, fraction = text.partition(".")
    moment = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    return int(moment.timestamp()) * 1000 + int((fraction + "000")[:3])


def _part_blocks(partition: str, name: str) -> tuple[int, int, int] | None:
    """(min block, max block, mutation number or 0) from a part's name,
    ``<partition>_<min>_<max>_<level>[_<mutation>]``; None for any other name."""
    prefix = f"{partition}_"
    fields = name[len(prefix) :].split("_") if name.startswith(prefix) else []
    if len(fields) not in (3, 4) or not all(f.isdigit() for f in fields):
        return None
    low, high = int(fields[0]), int(fields[1])
    return low, high, int(fields[3]) if len(fields) == 4 else 0


def proves_unchanged(recorded: Any, table: str | None, rows: RowsByPart) -> bool:
    """Whether ``rows`` (``rows_by_part`` now) are the physical rows ``recorded``
    (a ``blocks`` record) describes: every part holding them covers only blocks
    covered then, mutated by no mutation begun since, holds no row inserted since
    (a block number used again), and there are as many, inserted when they were."""
    try:
        if table is None or recorded.get("table") != table:
            return False
        if sum(r.rows for r in rows.values()) != int(recorded["rows"]):
            return False
        if _hash_text(rows) != recorded["inserted_hash"]:
            return False
        inserted_by = _unix_ms(str(recorded["inserted_by"]))
        for (partition, name), counted in rows.items():
            if counted.newest_ms is None or counted.newest_ms > inserted_by:
                return False
            then = recorded["partitions"].get(partition)
            blocks = _part_blocks(partition, name)
            if then is None or blocks is None:
                return False
            low, high, mutation = blocks
            if mutation > int(then["mutation"]) or not any(
                int(a) <= low and high <= int(b) for a, b in then["blocks"]
            ):
                return False
        return True
    except (AttributeError, KeyError, TypeError, ValueError):  # a record of another shape
        return False


def unchanged_after_merges(
    ch: ClickHouse,
    before: TableParts,
    counted: dict[Chunk, RowsByPart],
    manifest: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Of the ``counted`` chunks (``rows_by_part`` after ``before`` was read), those
    whose ``blocks`` record proves them unchanged: key -> the manifest entry,
    refreshed to the parts now where that is sound (so the next run with nothing
    changed decides from the parts alone)."""
    if not before.provable or not counted:
        return {}
    if mutation_numbers(ch, before.spec.table) is None:  # pending: maybe applied as rows are read
        return {}
    now = TableParts(ch, before.spec)
    if now.table != before.table or not now.provable:
        return {}
    proven: dict[str, dict[str, Any]] = {}
    for chunk, rows in counted.items():
        entry = manifest[chunk.key]
        if not rows or not proves_unchanged(entry.get("blocks"), before.table, rows):
            continue
        entry = dict(entry)
        state = before.state(chunk)
        if state is not None:
            refreshed = blocks_record(state, rows, entry["blocks"]["inserted_by"])
            entry["blocks"] = refreshed or entry["blocks"]
            if now.state(chunk) == state:
                entry["parts"] = state.signature
        proven[chunk.key] = entry
    return proven


@dataclass(frozen=True)
class Decisions:
    """A run's chunks, and those decided unchanged without fingerprinting them."""

    chunks: list[Chunk]  # those with rows
    by_parts: set[str]  # keys whose parts are the ones recorded
    after_merges: dict[str, dict[str, Any]]  # keys proven unchanged -> the entry refreshed
    rows: dict[str, RowsByPart]  # key -> its physical rows, counted after the parts were read


def decide_from_parts(
    ch: ClickHouse,
    parts: TableParts,
    manifest: dict[str, dict[str, Any]],
    present: set[str],
    force: bool = False,
) -> Decisions:
    """The chunks of ``parts``'s table, and which of them (stored, unless ``force``)
    are unchanged as their parts tell. The months with rows are read from the primary
    index where it gives every part's key range (else from a scan of the month
    column): a month whose parts are the ones recorded reads no row; the others
    have their physical rows counted (the month column of those months alone),
    which says whether they still have rows and feeds the proof after merges."""
    spec = parts.spec
    months = parts.months()
    candidates = list_chunks(ch, spec) if months is None else [Chunk(spec, m) for m in months]
    by_parts: set[str] = set()
    for chunk in candidates if not force else ():
        state = parts.state(chunk)
        recorded = manifest.get(chunk.key, {}).get("parts")
        if chunk.key in present and state is not None and recorded == state.signature:
            by_parts.add(chunk.key)
    counted = {
        chunk: rows_by_part(ch, chunk, parts.inserted)
        for chunk in candidates
        if parts.parts is not None and chunk.key not in by_parts
    }
    # A month the index spans without a row is no chunk; a whole table always is.
    chunks = [c for c in candidates if not c.month or c.key in by_parts or counted.get(c, True)]
    provable = {
        chunk: rows
        for chunk, rows in counted.items()
        if not force and chunk.key in present and manifest.get(chunk.key, {}).get("blocks")
    }
    return Decisions(
        chunks,
        by_parts,
        unchanged_after_merges(ch, parts, provable, manifest),
        {chunk.key: rows for chunk, rows in counted.items()},
    )
