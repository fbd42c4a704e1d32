"""Shared ClickHouse access: the connection, the schema and the atomic table swap.

``ClickHouseResource`` (the Dagster resource) is imported on first use, so the
connection layer stays importable, and quick to import, without Dagster.
"""

from typing import Any

from ooni_pipeline.clickhouse.connection import ClickHouse, ClickHouseError, quote_identifier

__all__ = ["ClickHouse", "ClickHouseError", "ClickHouseResource", "quote_identifier"]


def __getattr__(name: str) -> Any:
    if name == "ClickHouseResource":
        from ooni_pipeline.clickhouse.resource import ClickHouseResource

        return ClickHouseResource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
