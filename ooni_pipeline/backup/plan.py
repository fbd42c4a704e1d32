"""What a backup consists of: tables, their chunks, their fingerprints and queries.

A table is backed up whole (small tables) or one object per month of a time column
(``fastpath``). Rows are read deduplicated (``FINAL``) where the engine replaces or
collapses rows, so an object, and the fingerprint that decides whether to upload
it again, do not depend on whether background merges have run yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from ooni_pipeline.clickhouse import ClickHouse, quote_identifier

OBJECT_PREFIX = "clickhouse_export/csv/"
MANIFEST_KEY = "clickhouse_export/manifest.json"
# Engines whose unmerged parts may hold rows that a merge would remove or fold.
_FINAL_ENGINES = (
    "ReplacingMergeTree",
    "CollapsingMergeTree",
    "VersionedCollapsingMergeTree",
    "SummingMergeTree",
    "AggregatingMergeTree",
)


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


def final_clause(ch: ClickHouse, table: str) -> str:
    engine = ch.scalar(
        "SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
        {"t": table},
    )
    if engine is None:
        raise ValueError(f"table {table!r} does not exist")
    return " FINAL" if engine in _FINAL_ENGINES else ""


def list_chunks(ch: ClickHouse, spec: BackupTable) -> list[Chunk]:
    """The chunks that have rows, found with one query."""
    if not spec.month_column:
        return [Chunk(spec)]
    column = quote_identifier(spec.month_column)
    months = ch.query_rows(
        f"SELECT DISTINCT toString(toYYYYMM({column}, 'UTC')) AS m FROM {quote_identifier(spec.table)} ORDER BY m"
    )
    return [Chunk(spec, month) for (month,) in months]


def select_sql(chunk: Chunk, final: str, max_threads: int) -> tuple[str, dict[str, Any]]:
    where, params = chunk.where()
    return (
        f"SELECT * FROM {quote_identifier(chunk.spec.table)}{final} WHERE {where} "
        f"SETTINGS max_threads = {int(max_threads)}",
        params,
    )


def fingerprint_sql(table_sql: str) -> str:
    """Row count and an order-independent checksum of every column of a row set."""
    return f"SELECT count(), sum(cityHash64(*)) FROM {table_sql}"


def fingerprint(ch: ClickHouse, chunk: Chunk, final: str) -> tuple[int, str]:
    """(rows, fingerprint) of the chunk's deduplicated content, stable under merges."""
    where, params = chunk.where()
    rows, checksum = ch.query_rows(
        fingerprint_sql(f"{quote_identifier(chunk.spec.table)}{final} WHERE {where}"), params
    )[0]
    return int(rows), f"{int(rows)}:{int(checksum):016x}"
