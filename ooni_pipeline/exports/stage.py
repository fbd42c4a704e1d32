"""A day's (or month's) rows computed once, for several exports to read.

The expensive part of every export is the deduplication of ``fastpath`` (one group
per ``measurement_uid``). The daily consumer exports all start from the same
deduplicated rows, so one query writes them to a stage table, and each export is a
cheap query on it: one scan of the day for all of them, however many watchlists.

A stage is a table named for this use only, dropped when the block ends, error or
not (a session's temporary table would do, but the server client keeps no
session). A process killed in the block leaves one ``_exports_stage_*`` table
behind, harmless and safe to drop. Stages are in memory (``Memory`` engine: a day of
2M measurements is some 300 MB, held for the step only), which the benchmark found a
third faster than a MergeTree that compresses, sorts and writes them; readers sort.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ooni_pipeline.clickhouse import ClickHouse, quote_identifier
from ooni_pipeline.exports.website_metrics_sql import spreadsheet_select_list

STAGE_PREFIX = "_exports_stage_"


@contextmanager
def staged(ch: ClickHouse, sql: str, params: dict[str, Any]) -> Iterator[str]:
    """The quoted name of a table holding the rows of ``sql``."""
    table = quote_identifier(f"{STAGE_PREFIX}{uuid.uuid4().hex}")
    try:
        ch.command(f"CREATE TABLE {table} ENGINE = Memory AS {sql}", params)
        yield table
    finally:
        ch.command(f"DROP TABLE IF EXISTS {table} SYNC")


def ordered(table: str, columns: tuple[str, ...], order: str) -> str:
    """The rows of a stage table in the export's column order and row order."""
    return f"SELECT {', '.join(f'`{c}`' for c in columns)} FROM {table} ORDER BY {order}"


def ordered_csv(table: str, columns: tuple[str, ...], order: str) -> str:
    """As ``ordered``, probe text made spreadsheet-safe (``website_metrics_sql``),
    the rows in the same order as the Parquet file's."""
    return f"SELECT {spreadsheet_select_list(columns, aliased=False)} FROM {table} ORDER BY {order}"
