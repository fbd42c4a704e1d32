"""What a backup consists of: tables, their chunks, their fingerprints and queries.

A table is backed up whole (small tables) or one object per month of a time column
(``fastpath``). Rows are read deduplicated (``FINAL``) where the engine replaces or
collapses rows, so an object, and the fingerprint that decides whether to upload
it again, do not depend on whether background merges have run yet.

A table that records when each row was inserted (a column defaulting to ``now()``
or ``now64()``, like ``fastpath.update_time``) is read as of one instant: the
export and its fingerprint filter on that column in ``PREWHERE``, which ClickHouse
applies before ``FINAL`` folds versions, so rows inserted during the export are in
neither. Whether the snapshot held is checked after the export: the lines it sent
against those the fingerprinted rows make, and the chunk's parts unchanged, or else
a second fingerprint (see ``assets.back_up_chunk``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from datetime import date, datetime, timezone
from typing import Any

from ooni_pipeline.clickhouse import ClickHouse, quote_identifier

OBJECT_PREFIX = "clickhouse_export/csv/"
MANIFESTS_PREFIX = "clickhouse_export/manifests/"
LEGACY_MANIFEST_KEY = "clickhouse_export/manifest.json"  # one file for every table, before 2026-11
# Engines whose unmerged parts may hold rows that a merge would remove or fold.
_FINAL_ENGINES = (
    "ReplacingMergeTree",
    "CollapsingMergeTree",
    "VersionedCollapsingMergeTree",
    "SummingMergeTree",
    "AggregatingMergeTree",
)
# Replicated (self-hosted clusters) and Shared (ClickHouse Cloud) variants merge alike.
_ENGINE_VARIANT = re.compile(r"^(Replicated|Shared)(?=\w*MergeTree$)")


@dataclass(frozen=True)
class BackupTable:
    """A table to back up: whole, or by month of ``month_column``."""

    table: str
    month_column: str | None = None

    def __post_init__(self) -> None:
        quote_identifier(self.table)
        if self.month_column:
            quote_identifier(self.month_column)


FASTPATH_SPEC = BackupTable("fastpath", "measurement_start_time")
# OONI's default: fastpath by month, the small tables whole.
DEFAULT_TABLES = (
    FASTPATH_SPEC,
    BackupTable("citizenlab"),
    BackupTable("fingerprints_dns"),
    BackupTable("fingerprints_http"),
    BackupTable("asnmeta"),
)


def parse_tables(spec: str) -> tuple[BackupTable, ...]:
    """``"fastpath:measurement_start_time,citizenlab"`` -> tables (``OONI_BACKUP_TABLES``)."""
    tables = []
    for item in (part.strip() for part in spec.split(",")):
        if item:
            table, _, column = item.partition(":")
            tables.append(BackupTable(table.strip(), column.strip() or None))
    if not tables:
        raise ValueError("OONI_BACKUP_TABLES names no table")
    return tuple(tables)


def manifest_key(table: str) -> str:
    quote_identifier(table)
    return f"{MANIFESTS_PREFIX}{table}.json"


@dataclass(frozen=True)
class Chunk:
    """One object: a whole table, or a month (``YYYYMM``) of it."""

    spec: BackupTable
    month: str | None = None

    @property
    def key(self) -> str:
        suffix = f"_{self.month}" if self.month else ""
        return f"{OBJECT_PREFIX}{self.spec.table}{suffix}.csv.zstd"

    @property
    def label(self) -> str:
        return f"{self.spec.table} {self.month}" if self.month else self.spec.table

    def bounds(self) -> tuple[int, int]:
        """The month's [start, end) in Unix seconds (UTC)."""
        year, month = int(self.month[:4]), int(self.month[4:])
        start = datetime(year, month, 1, tzinfo=timezone.utc)
        end = (
            datetime(year + 1, 1, 1, tzinfo=timezone.utc)
            if month == 12
            else datetime(year, month + 1, 1, tzinfo=timezone.utc)
        )
        return int(start.timestamp()), int(end.timestamp())

    def where(self) -> tuple[str, dict[str, Any]]:
        """A WHERE clause selecting the chunk's rows (a primary-key range for months)."""
        if not self.month:
            return "1", {}
        year, month = int(self.month[:4]), int(self.month[4:])
        start = date(year, month, 1)
        end = date(year + 1, 1, 1) if month == 12 else date(year, month + 1, 1)
        column = quote_identifier(self.spec.month_column or "")
        return (
            f"{column} >= toDateTime({{chunk_start:String}}, 'UTC') AND {column} < toDateTime({{chunk_end:String}}, 'UTC')",
            {"chunk_start": f"{start} 00:00:00", "chunk_end": f"{end} 00:00:00"},
        )


def needs_final(engine: str) -> bool:
    """Whether rows of a table with this engine are read with ``FINAL``."""
    return _ENGINE_VARIANT.sub("", engine) in _FINAL_ENGINES


def final_clause(ch: ClickHouse, table: str) -> str:
    engine = ch.scalar(
        "SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
        {"t": table},
    )
    if engine is None:
        raise ValueError(f"table {table!r} does not exist")
    return " FINAL" if needs_final(engine) else ""


def insertion_time_column(ch: ClickHouse, table: str) -> str | None:
    """A column that holds each row's insertion time (default ``now()``/``now64()``)."""
    name = ch.scalar(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String} "
        "AND default_kind IN ('MATERIALIZED', 'DEFAULT') "
        "AND match(default_expression, '^now(64)?\\(') ORDER BY position LIMIT 1",
        {"t": table},
    )
    return str(name) if name else None


@dataclass(frozen=True)
class Source:
    """How a table's rows are read: ``FINAL`` or not, and as of which instant."""

    table: str
    final: str = ""
    snapshot_column: str | None = None
    snapshot_time: str | None = None  # 'YYYY-MM-DD hh:mm:ss.fff', the engine's clock
    line_breaks: str = "0"  # SQL: the line breaks inside a row's CSV fields (line_breaks_sql)

    def at_now(self, ch: ClickHouse, lag_s: float = 0.0) -> Source:
        """This source as of the engine's clock ``lag_s`` ago (if it has an insertion
        time). The lag leaves out inserts still being written: a block's insertion
        time is set before its part becomes visible."""
        if not self.snapshot_column:
            return self
        now = ch.scalar(
            "SELECT toString(now64(3, 'UTC') - toIntervalMillisecond({lag_ms:UInt64}))",
            {"lag_ms": int(lag_s * 1000)},
        )
        return replace(self, snapshot_time=str(now))

    def rows(self, chunk: Chunk) -> tuple[str, dict[str, Any]]:
        """``table [FINAL] [PREWHERE snapshot] WHERE chunk`` and its parameters."""
        where, params = chunk.where()
        sql = f"{quote_identifier(self.table)}{self.final}"
        if self.snapshot_column and self.snapshot_time:
            column = quote_identifier(self.snapshot_column)
            sql += f" PREWHERE {column} <= toDateTime64({{snapshot_time:String}}, 3, 'UTC')"
            params = {**params, "snapshot_time": self.snapshot_time}
        return f"{sql} WHERE {where}", params


def table_source(ch: ClickHouse, table: str) -> Source:
    return Source(
        table,
        final_clause(ch, table),
        insertion_time_column(ch, table),
        line_breaks=line_breaks_sql(select_star_columns(ch, table)),
    )


def list_chunks(ch: ClickHouse, spec: BackupTable) -> list[Chunk]:
    """The chunks that have rows, found with one query."""
    if not spec.month_column:
        return [Chunk(spec)]
    column = quote_identifier(spec.month_column)
    months = ch.query_rows(
        f"SELECT DISTINCT toString(toYYYYMM({column}, 'UTC')) AS m FROM {quote_identifier(spec.table)} ORDER BY m"
    )
    return [Chunk(spec, month) for (month,) in months]


# A row's hash over every column. ``cityHash64(*)`` is NULL for a row holding a NULL
# (OONI's fastpath has ``ooni_run_link_id Nullable(UInt64)``), and ``sum`` skips
# NULLs: such rows would be invisible to the fingerprint. Hashed as a tuple they count
# (NULL told from 0); rows without NULLs keep the hash they always had.
ROW_HASH = "ifNull(cityHash64(*), cityHash64(tuple(*)))"


def fingerprint_sql(table_sql: str, extra: str = "") -> str:
    """Row count and an order-independent checksum of every column of a row set
    (then ``extra``, more aggregates over the same rows)."""
    return f"SELECT count(), sum({ROW_HASH}){extra} FROM {table_sql}"


def fingerprint_text(rows: int, checksum: int) -> str:
    """A fingerprint as the manifest records it: ``rows:checksum``."""
    return f"{int(rows)}:{int(checksum):016x}"


# Types whose CSV field is the value itself, quoted: a line break in it stays one
# (every other type is written escaped: arrays, maps, tuples, JSON...).
_RAW_TEXT_TYPE = re.compile(
    r"(LowCardinality\()?(Nullable\()?(String|FixedString\(\d+\)|Enum(8|16)?\(.*\))\)?\)?"
)


def line_breaks_sql(columns: list[tuple[str, str]]) -> str:
    """SQL counting the line breaks inside a row's CSV fields (0 if none can hold one),
    for ``SELECT *``'s ``columns`` (name, type)."""
    counts = [
        f"countSubstrings(toString({quote_identifier(name)}), '\\n')"
        for name, kind in columns
        if _RAW_TEXT_TYPE.fullmatch(kind)
    ]
    return " + ".join(counts) or "0"


@dataclass(frozen=True)
class Content:
    """What a chunk holds: its rows, their fingerprint, and the lines their CSV makes
    (a line per row, plus the line breaks inside its fields)."""

    rows: int
    fingerprint: str
    lines: int

    @property
    def object_lines(self) -> int:
        """The lines of its object: the rows' and the header."""
        return self.lines + 1


def fingerprint(ch: ClickHouse, chunk: Chunk, source: Source) -> Content:
    """The chunk's deduplicated content, stable under merges."""
    rows_sql, params = source.rows(chunk)
    rows, checksum, inside = ch.query_rows(
        fingerprint_sql(rows_sql, f", sum({source.line_breaks})"), params
    )[0]
    return Content(int(rows), fingerprint_text(rows, checksum), int(rows) + int(inside or 0))


@dataclass(frozen=True)
class PartsState:
    """The active parts that may hold a chunk's rows, in a form cheap to compare.

    Parts are immutable and their names unique, so an equal ``signature`` means the
    chunk's rows are the ones read last time: deciding "unchanged" costs a look at
    ``system.parts`` and the primary index (O(parts + marks)), not a scan of the rows.
    """

    signature: str
    newest_s: int  # the latest part's modification time (Unix seconds, engine clock)

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
    key_min: int | None = None  # the month column's first and last value (Unix s)
    key_max: int | None = None


class TableParts:
    """A table's active parts, read once; ``state(chunk)`` selects a chunk's.

    A month's parts are those whose range of the month column (first and last value
    of the primary index, when the column leads the sorting key) meets the month;
    otherwise every part of the table counts, which is safe, only less often equal.
    Tables without parts (``EmbeddedRocksDB``...) have no state: always fingerprinted.
    """

    def __init__(self, ch: ClickHouse, spec: BackupTable):
        self.spec = spec
        self.parts: list[_Part] | None = None
        engine, sorting_key = ch.query_rows(
            "SELECT engine, sorting_key FROM system.tables "
            "WHERE database = currentDatabase() AND name = {t:String}",
            {"t": spec.table},
        )[0]
        if not str(engine).endswith("MergeTree"):
            return
        ranges: dict[str, tuple[int, int | None]] = {}
        leading = str(sorting_key).split(",")[0].strip()
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
                *ranges.get(str(name), (None, None)),
            )
            for name, rows, files_hash, modified in ch.query_rows(
                "SELECT name, rows, hash_of_all_files, toUnixTimestamp(modification_time) "
                "FROM system.parts WHERE database = currentDatabase() AND table = {t:String} "
                "AND active AND rows > 0",
                {"t": spec.table},
            )
        ]

    def state(self, chunk: Chunk) -> PartsState | None:
        if self.parts is None:
            return None
        parts = [p for p in self.parts if _may_hold(p, chunk)]
        text = "\n".join(sorted(f"{p.name}:{p.rows}:{p.files_hash}" for p in parts))
        return PartsState(
            hashlib.sha256(text.encode()).hexdigest()[:32],
            max((p.modified_s for p in parts), default=0),
        )


def _may_hold(part: _Part, chunk: Chunk) -> bool:
    if not chunk.month or part.key_min is None:
        return True
    start, end = chunk.bounds()
    return part.key_min < end and (part.key_max is None or part.key_max >= start)


def parts_state(ch: ClickHouse, chunk: Chunk) -> PartsState | None:
    """The chunk's parts now (see ``TableParts``)."""
    return TableParts(ch, chunk.spec).state(chunk)


def select_star_columns(ch: ClickHouse, table: str) -> list[tuple[str, str]]:
    """``SELECT *``'s columns, (name, type) in order: what a backup object holds."""
    rows = ch.query_rows(f"DESCRIBE TABLE (SELECT * FROM {quote_identifier(table)})")
    return [(str(row[0]), str(row[1])) for row in rows]


def table_structure(ch: ClickHouse, table: str) -> str:
    """``SELECT *``'s columns as a table-function structure (``name Type, ...``)."""
    return ", ".join(f"{quote_identifier(n)} {t}" for n, t in select_star_columns(ch, table))
