"""``blocking_status`` and ``blocking_events``: the blocking detector as hourly assets.

One step materializes both, because the events of a run are grouped from exactly the
hours its detector pass wrote (which reach past the requested hours when late data
or a hole demands it: see ``detector.status``).
"""

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from ooni_pipeline.clickhouse import ClickHouse, ClickHouseResource
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.common import (
    CLICKHOUSE_POOL,
    OWNER,
    column_schema_metadata,
    one_run_at_a_time,
)
from ooni_pipeline.detector import sql
from ooni_pipeline.exports.watchlist_file import normalize_domain
from ooni_pipeline.exports.watchlists import consumers_from_env, spellings
from ooni_pipeline.fastpath.assets import FASTPATH_KEY
from ooni_pipeline.object_store import ObjectStoreResource
from ooni_pipeline.test_lists.assets import CITIZENLAB_KEY
from ooni_pipeline.untrusted import excerpt

# The detector's engine (numpy, pandas) is imported when it runs: every run of any job
# loads this module, and pandas alone costs it a fifth of a second.
if TYPE_CHECKING:
    import pandas as pd

    from ooni_pipeline.detector.cusum import CusumParams
    from ooni_pipeline.detector.events import EventParams
    from ooni_pipeline.detector.status import StatusRun
    from ooni_pipeline.exports.watchlist_file import Consumer

BLOCKING_STATUS_KEY = dg.AssetKey("blocking_status")
BLOCKING_EVENTS_KEY = dg.AssetKey("blocking_events")
DETECTION_HOURS = dg.HourlyPartitionsDefinition(start_date="2024-01-01-00:00", timezone="UTC")
DEFAULT_CATEGORIES = ("GRP",)
GLOBAL_LIST_CC = "ZZ"
# Re-detect the hours of a day whose fastpath data version moved (late uploads); the
# run carries on over every later hour already detected. Only fastpath counts: a
# citizenlab update concerns every hour since 2024 and takes effect from the next one.
REDETECT_WHEN_SOURCE_CHANGED = (
    dg.AutomationCondition.any_deps_updated()
    .allow(dg.AssetSelection.assets(FASTPATH_KEY))
    .since_last_handled()
    & ~dg.AutomationCondition.in_progress()
    & ~dg.AutomationCondition.any_deps_in_progress()
).with_label("fastpath data version of the day changed")


class BlockingDetectorConfig(dg.Config):
    extra_domains: list[str] = Field(
        default_factory=list,
        description="domains watched besides the test lists' global social-networking ones "
        "and the watchlist file's",
    )
    categories: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CATEGORIES),
        description="citizenlab category codes of the global list (cc ZZ) that are watched",
    )
    mu0: float = Field(default=0.0, description="CUSUM: expected blocked share when OK")
    mu1: float = Field(default=0.7, description="CUSUM: expected blocked share when blocked")
    edd: float = Field(
        default=6.0,
        gt=0,
        description="CUSUM: expected detection delay in measured hours; h = edd*(mu1-mu0)/2",
    )
    max_hour_weight: float = Field(
        default=3.0,
        gt=0,
        description="CUSUM: an hour weighs its usable measurements, at most this many",
    )
    gap_halflife_hours: float = Field(
        default=48.0, gt=0, description="CUSUM memory half-life across gaps"
    )
    forget_after_hours: int = Field(
        default=240, gt=24, description="a series silent this long starts over unknown"
    )
    shutdown_baseline_hours: int = Field(default=24, gt=0)
    shutdown_min_hourly: float = Field(default=10.0, ge=1)
    shutdown_silent_hours: int = Field(default=2, ge=1)
    coverage_share: float = Field(default=0.5, ge=0, le=1)
    announce_within_hours: int = Field(default=48, ge=0)

    def cusum(self) -> "CusumParams":
        from ooni_pipeline.detector.cusum import CusumParams

        return CusumParams(
            mu0=self.mu0,
            mu1=self.mu1,
            edd=self.edd,
            max_hour_weight=self.max_hour_weight,
            gap_halflife_hours=self.gap_halflife_hours,
            forget_after_hours=self.forget_after_hours,
        )

    def events(self) -> "EventParams":
        from ooni_pipeline.detector.events import EventParams

        return EventParams(
            baseline_hours=self.shutdown_baseline_hours,
            min_hourly=self.shutdown_min_hourly,
            silent_hours=self.shutdown_silent_hours,
            coverage_share=self.coverage_share,
            announce_within_hours=self.announce_within_hours,
        )


def watchlist(
    ch: ClickHouse, config: BlockingDetectorConfig, consumers: "dict[str, Consumer]"
) -> list[str]:
    """The watched domains: the global test list's rows of the configured categories
    (OONI's detector: ``GRP``), plus ``extra_domains`` and the domains of the watchlist
    file's consumers, these two in every spelling a probe may send (``spellings``)."""
    rows = ch.query_rows(
        sql.WATCHLIST_SQL, {"categories": list(config.categories), "cc": GLOBAL_LIST_CC}
    )
    domains = {str(domain) for (domain,) in rows}
    for domain in extra_domains(config.extra_domains):
        domains.update(spellings(domain))
    for consumer in consumers.values():
        for domain in consumer.domains:
            domains.update(spellings(domain))
    return sorted(domains)


def extra_domains(values: list[str]) -> list[str]:
    """``extra_domains`` as lowercase IDNA, validated as the watchlist file's domains
    are: a value that is no domain name fails the run before anything is written,
    naming its place in the run config and an excerpt of it."""
    out = []
    for i, value in enumerate(values):
        domain = normalize_domain(value)
        if domain is None:
            raise dg.Failure(
                f"run config ops.blocking_detector.config.extra_domains[{i}]: "
                f"{excerpt(value)} is not a domain name"
            )
        out.append(domain)
    return out


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            BLOCKING_STATUS_KEY,
            deps=[FASTPATH_KEY, CITIZENLAB_KEY],
            description=(
                "ClickHouse table `blocking_status`: per UTC hour of `measurement_start_time` "
                "and watched series (probe_cc, probe_asn, domain), the hour's web_connectivity "
                "measurements, the share of each outcome, and OONI's CUSUM detector state "
                "(unknown / ok / blocked), its statistics and the change it made."
            ),
            kinds={"clickhouse"},
            owners=[OWNER],
            group_name="detector",
            automation_condition=REDETECT_WHEN_SOURCE_CHANGED,
        ),
        dg.AssetSpec(
            BLOCKING_EVENTS_KEY,
            deps=[BLOCKING_STATUS_KEY],
            description=(
                "ClickHouse table `blocking_events`: one event per blocking episode of a "
                "(country, domain), with its networks, or per country whose measurements "
                "stopped; Atom feeds at `feeds/blocking/<CC>.atom`, "
                "`feeds/blocking/global.atom` and, for each consumer of the watchlist file, "
                "`feeds/watchlists/<consumer>.atom`; a chat message per new, ended or "
                "withdrawn event, to the operator and to consumers with a webhook."
            ),
            kinds={"clickhouse", "s3"},
            owners=[OWNER],
            group_name="detector",
        ),
    ],
    partitions_def=DETECTION_HOURS,
    pool=CLICKHOUSE_POOL,
    backfill_policy=dg.BackfillPolicy.single_run(),
    can_subset=False,
)
def blocking_detector(
    context: dg.AssetExecutionContext,
    config: BlockingDetectorConfig,
    clickhouse: ClickHouseResource,
    object_store: ObjectStoreResource,
):
    """OONI's blocking detector over the run's hours (see ``ooni_pipeline.detector``)."""
    from ooni_pipeline.detector.pipeline import detect
    from ooni_pipeline.detector.status import hour_number

    window = context.partition_time_window
    first = hour_number(window.start)
    last = hour_number(window.end) - 1
    cusum, event_params = config.cusum(), config.events()
    # The watchlist file as the code location loaded it (a wrong one fails the load).
    consumers = consumers_from_env()
    store = object_store.get_store()
    # One detector pass at a time: the state of an hour is read from the table, so a
    # re-detection of past hours and the hourly run must not interleave.
    with clickhouse.connect() as ch, one_run_at_a_time(context, ch, "blocking_detector"):
        ensure_tables(ch, "fastpath", "citizenlab", "blocking_status", "blocking_events")
        # Taken under the lock: versions of successive passes only grow.
        version = datetime.now(UTC).replace(tzinfo=None)
        domains = watchlist(ch, config, consumers)
        if not domains:
            context.log.warning(
                "the watchlist is empty: materialize citizenlab, or set extra_domains"
            )
        result = detect(
            ch,
            store,
            first,
            last,
            domains,
            cusum,
            event_params,
            version,
            context.log.info,
            consumers=consumers,
        )
        schema_status = column_schema_metadata(ch, "blocking_status")
        schema_events = column_schema_metadata(ch, "blocking_events")
    yield dg.MaterializeResult(
        asset_key=BLOCKING_STATUS_KEY,
        metadata={
            **status_metadata(result.status, domains, cusum),
            **schema_status,
        },
    )
    yield dg.MaterializeResult(
        asset_key=BLOCKING_EVENTS_KEY,
        metadata={
            "events_written": len(result.written),
            "events_ongoing": _count(result.events, "ongoing"),
            "events_withdrawn_now": _count(result.written, "withdrawn"),
            "messages_posted": result.messages_posted,
            "consumer_messages_posted": dg.MetadataValue.json(result.consumer_messages),
            "feeds_written": dg.MetadataValue.json(result.feeds),
            "parameters": dg.MetadataValue.json(event_params.as_metadata()),
            **schema_events,
        },
    )


def _count(events: "pd.DataFrame", status: str) -> int:
    return int((events["status"] == status).sum()) if len(events) else 0


def status_metadata(
    status: "StatusRun", domains: list[str], params: "CusumParams"
) -> dict[str, Any]:
    from ooni_pipeline.detector.status import hour_text

    return {
        "dagster/row_count": status.rows,
        "hours_detected_from": hour_text(status.first_hour),
        "hours_detected_to": hour_text(status.last_hour),
        "hours_detected": status.hours,
        "series": status.series,
        "measured_series_hours": status.measured_rows,
        "changes_to_blocked": status.changes_to_blocked,
        "changes_to_ok": status.changes_to_ok,
        "blocked_series_at_end": status.blocked_at_end,
        "watched_domains": len(domains),
        "duration_s": round(status.duration_s, 3),
        "parameters": dg.MetadataValue.json(params.as_metadata()),
    }
