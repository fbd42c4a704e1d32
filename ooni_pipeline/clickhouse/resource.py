"""The Dagster resource that hands assets a ``ClickHouse`` connection."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from ooni_pipeline import settings
from ooni_pipeline.clickhouse.connection import ClickHouse


class ClickHouseResource(dg.ConfigurableResource):
    """ClickHouse, a server or embedded chdb.

    Left unset, ``url`` is read from ``OONI_CLICKHOUSE_URL`` when a run starts (so a
    password never sits in the UI's resource config); unset there too, it is the
    embedded database at ``$OONI_DATA_DIR/clickhouse``.
    """

    url: str | None = Field(
        default=None, description="http(s)://user:password@host:port/db or chdb:///abs/path"
    )
    lock_timeout_s: float = Field(
        default=900.0,
        description="How long to wait for another process to release embedded ClickHouse",
    )

    cluster: str | None = Field(
        default=None,
        description="ClickHouse cluster name for ON CLUSTER DDL (unset: OONI_CLICKHOUSE_CLUSTER, "
        "unset there too: one server)",
    )

    def resolved_url(self) -> str:
        url = self.url or settings.env("OONI_CLICKHOUSE_URL")
        if url:
            return url
        return f"chdb://{settings.data_dir() / 'clickhouse'}"

    @contextmanager
    def connect(self) -> Iterator[ClickHouse]:
        """An open connection for the duration of the block.

        Embedded, the data directory is locked only inside the block, so steps of
        other runs can take their turn as soon as this one is done.
        """
        with ClickHouse(
            self.resolved_url(),
            lock_timeout_s=self.lock_timeout_s,
            cluster=self.cluster or settings.env("OONI_CLICKHOUSE_CLUSTER"),
        ) as ch:
            yield ch
