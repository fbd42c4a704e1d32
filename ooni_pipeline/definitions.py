"""The code location: every domain's definitions merged, plus the shared resources,
source-code references, freshness policies and the failure alert.

Loading this module touches neither the network nor the database, and imports no
library only some steps use (pandas, requests: see test_definitions).
"""

from __future__ import annotations

import gc

import dagster as dg

from ooni_pipeline.asn_metadata import definitions as asn_metadata
from ooni_pipeline.backup import definitions as backup
from ooni_pipeline.clickhouse import ClickHouseResource
from ooni_pipeline.common import MAX_RETRIES_TAG
from ooni_pipeline.detector import definitions as detector
from ooni_pipeline.exports import definitions as exports
from ooni_pipeline.fastpath import definitions as fastpath
from ooni_pipeline.fingerprints import definitions as fingerprints
from ooni_pipeline.geoip import definitions as geoip
from ooni_pipeline.object_store import ObjectStoreResource
from ooni_pipeline.operations import (
    build_delayed_retry_sensor,
    run_failure_alert_sensor,
    with_freshness,
)
from ooni_pipeline.test_lists import definitions as test_lists

DOMAINS = (
    test_lists,
    fingerprints,
    asn_metadata,
    geoip,
    fastpath,
    backup,
    exports,
    detector,
)


def build_definitions() -> dg.Definitions:
    domains = dg.Definitions.merge(*(domain.defs for domain in DOMAINS))
    assets = with_freshness(dg.with_source_code_references(list(domains.assets or [])))
    scheduled_jobs = {s.job.name: s.job for s in domains.schedules or []}
    retried = [job for job in scheduled_jobs.values() if MAX_RETRIES_TAG in (job.tags or {})]
    return dg.Definitions(
        assets=assets,
        asset_checks=domains.asset_checks,
        schedules=domains.schedules,
        sensors=[
            *(domains.sensors or []),
            run_failure_alert_sensor,
            build_delayed_retry_sensor(retried),
        ],
        jobs=domains.jobs,
        resources={
            "clickhouse": ClickHouseResource(),
            "object_store": ObjectStoreResource(),
        },
        # Steps run in the run's own process: every step here is one ClickHouse query
        # plan or one stream, and the `clickhouse` pool serialises them anyway; a
        # process per step cost ~5 s of imports per run (bench/results/detector.txt:
        # an hour of the detector through the CLI 12.7 s -> 6.9 s).
        executor=dg.in_process_executor,
    )


defs = build_definitions()

# What exists now (modules, classes, the definitions) lives as long as the process:
# the collector need not scan it again in every full collection and at exit. That
# scanning was ~0.7 s of CPU in each run of the CLI (bench_website_metrics.py, empty day).
gc.freeze()
