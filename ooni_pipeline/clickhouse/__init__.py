"""Shared ClickHouse access: the connection, the schema and the atomic table swap."""

from ooni_pipeline.clickhouse.connection import ClickHouse, ClickHouseError, quote_identifier
from ooni_pipeline.clickhouse.resource import ClickHouseResource

__all__ = ["ClickHouse", "ClickHouseError", "ClickHouseResource", "quote_identifier"]
