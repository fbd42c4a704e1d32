"""The per-measurement website-metrics table as Parquet, in a Hive layout.

``exports/parquet/website_metrics/day=<YYYY-MM-DD>/website_metrics_<YYYY-MM-DD>.parquet``:
the rows and columns of the ``website_metrics`` CSV of the same day, written by
ClickHouse, so that one glob (``day=2024-03-*/*.parquet``) reads a month in DuckDB,
pandas or Spark, with ``day`` as a column. Materialized by the
``consumer_exports_daily`` step (``daily_consumers``).
"""

import dagster as dg

from ooni_pipeline.exports.stage import ordered
from ooni_pipeline.exports.website_metrics_sql import CSV_COLUMNS

WEBSITE_METRICS_PARQUET_KEY = dg.AssetKey("website_metrics_parquet")
# The stage holds the website_metrics rows; this is their CSV order.
ROW_ORDER = "measurement_start_time, explorer_url"


def parquet_key(day: str) -> str:
    return f"exports/parquet/website_metrics/day={day}/website_metrics_{day}.parquet"


def parquet_sql(table: str) -> str:
    """The day's rows from the stage table, in the CSV's columns and order."""
    return ordered(table, CSV_COLUMNS, ROW_ORDER)
