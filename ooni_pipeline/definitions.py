"""The code location: every domain's definitions merged, plus the shared resources.

Loading this module touches neither the network nor the database.
"""

from __future__ import annotations

import dagster as dg

from ooni_pipeline import exports, test_lists
from ooni_pipeline.clickhouse import ClickHouseResource
from ooni_pipeline.object_store import ObjectStoreResource

DOMAINS: list[dg.Definitions] = [
    test_lists.defs,
    exports.defs,
]

defs = dg.Definitions.merge(
    *DOMAINS,
    dg.Definitions(
        resources={
            "clickhouse": ClickHouseResource(),
            "object_store": ObjectStoreResource(),
        }
    ),
)
