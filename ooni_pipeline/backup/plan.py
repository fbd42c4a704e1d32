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
    row_hash: str = "cityHash64(*)"  # SQL: a row's hash (row_hash_sql)
    # The as-of condition repeated in WHERE (servers before 26: see ``rows``).
    as_of_in_where: bool = True

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
            as_of = f"{column} <= toDateTime64({{snapshot_time:String}}, 3, 'UTC')"
            # PREWHERE: before FINAL, so a row changed after the instant is read as it
            # was then. Repeated in WHERE, where it is always true, because ClickHouse
            # 24.8 (OONI's cluster) drops a PREWHERE-only column before FINAL needs it
            # as the version column ("Not found column update_time in block"); 26.9
            # does not, and carrying the column through FINAL costs it ~5 % of a
            # backup (bench/results/backup.txt), so servers from 26 on are spared.
            sql += f" PREWHERE {as_of}"
            params = {**params, "snapshot_time": self.snapshot_time}
            if self.as_of_in_where:
                where = f"{as_of} AND {where}"
        return f"{sql} WHERE {where}", params


def table_source(ch: ClickHouse, table: str) -> Source:
    columns = select_star_columns(ch, table)
    unsupported = unsupported_columns(columns)
    if unsupported:
        raise ValueError(
            f"table {table!r} has column(s) {', '.join(unsupported)} of a type CSV cannot give "
            "back as written (Variant, Dynamic, Tuple): not backed up"
        )
    return Source(
        table,
        final_clause(ch, table),
        insertion_time_column(ch, table),
        line_breaks=line_breaks_sql(columns),
        row_hash=row_hash_sql(columns),
        as_of_in_where=int(str(ch.scalar("SELECT version()")).split(".")[0]) < 26,
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


_NULLABLE = re.compile(r"(LowCardinality\()?Nullable\(")
# Types whose values CSV does not give back as written (a Variant's '1' and 1 are
# both read as one of them; a Tuple or a Dynamic holding one is written unquoted).
_NOT_IN_CSV = re.compile(r"\b(Variant|Dynamic|Tuple)\(|\bDynamic\b")
# The version of ``row_hash_sql`` a manifest entry's fingerprint was made with
# (``row_hash``); entries without one were made with ``LEGACY_ROW_HASH``.
ROW_HASH_VERSION = 2
LEGACY_ROW_HASH = "ifNull(cityHash64(*), cityHash64(tuple(*)))"


def unsupported_columns(columns: list[tuple[str, str]]) -> list[str]:
    """The columns a CSV backup cannot give back as they are (see ``_NOT_IN_CSV``)."""
    return [name for name, kind in columns if _NOT_IN_CSV.search(kind)]


def row_hash_sql(columns: list[tuple[str, str]]) -> str:
    """SQL: a row's hash over every column of ``SELECT *``'s ``columns`` (name, type).

    ``cityHash64`` of the columns in order, what ``cityHash64(*)`` gives, is NULL for a
    row holding a NULL (OONI's fastpath has ``ooni_run_link_id Nullable(UInt64)``),
    and ``sum`` skips NULLs: such rows would be invisible to the fingerprint. They are
    hashed with each nullable column as ``(isNull(c), c or its type's default)``
    instead: a NULL differs from 0, and whatever value the engine keeps under a NULL
    (an ``ALTER UPDATE … = NULL`` keeps the old one) is never read, as a CSV read back
    has none. ``cityHash64(tuple(*))`` hashed NULLs on recent servers, but throws on
    ClickHouse 24.8 (OONI's cluster) for a NULL in a tuple, an array or a map. Any
    other column whose type holds a nullable (``Array(Nullable(…))``,
    ``SimpleAggregateFunction(f, Nullable(…))``, ``JSON``) is hashed on every row as
    ``(isNull(c), its text, or '' for NULL)``: never NULL, and alike on 24.8 and 26.9
    (whose texts of a NULL differ)."""
    plain, safe = [], []
    for name, kind in columns:
        column = quote_identifier(name)
        if _NULLABLE.match(kind):
            plain.append(column)
            safe.append(
                f"tuple(isNull({column}), "
                f"ifNull({column}, defaultValueOfArgumentType(assumeNotNull({column}))))"
            )
        elif "Nullable(" in kind or re.search(r"\b(JSON|Object|Dynamic|Variant)\b", kind):
            text = (
                f"tuple(isNull({column}), if(isNull({column}), '', ifNull(toString({column}), '')))"
            )
            plain.append(text)
            safe.append(text)
        else:
            plain.append(column)
            safe.append(column)
    if not columns:
        return "cityHash64(*)"
    if plain == safe:
        return f"cityHash64({', '.join(plain)})"
    return f"ifNull(cityHash64({', '.join(plain)}), cityHash64({', '.join(safe)}))"


def fingerprint_sql(table_sql: str, row_hash: str, extra: str = "") -> str:
    """Row count and an order-independent checksum of every column of a row set
    (``row_hash``: ``row_hash_sql`` of its columns), then ``extra``, more aggregates
    over the same rows."""
    return f"SELECT count(), sum({row_hash}){extra} FROM {table_sql}"


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
        fingerprint_sql(rows_sql, source.row_hash, f", sum({source.line_breaks})"), params
    )[0]
    return Content(int(rows), fingerprint_text(rows, checksum), int(rows) + int(inside or 0))


def select_star_columns(ch: ClickHouse, table: str) -> list[tuple[str, str]]:
    """``SELECT *``'s columns, (name, type) in order: what a backup object holds."""
    rows = ch.query_rows(f"DESCRIBE TABLE (SELECT * FROM {quote_identifier(table)})")
    return [(str(row[0]), str(row[1])) for row in rows]


def table_structure(ch: ClickHouse, table: str) -> str:
    """``SELECT *``'s columns as a table-function structure (``name Type, ...``)."""
    return ", ".join(f"{quote_identifier(n)} {t}" for n, t in select_star_columns(ch, table))
