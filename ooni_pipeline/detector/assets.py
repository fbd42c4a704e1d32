"""``blocking_status`` and ``blocking_events``: the blocking detector as hourly assets.

One step materializes both, because the events of a run are grouped from exactly the
hours its detector pass wrote (which reach past the requested hours when late data
or a hole demands it: see ``detector.status``).
"""

from datetime import UTC, datetime
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field

from ooni_pipeline import settings
from ooni_pipeline.clickhouse import ClickHouse, ClickHouseResource
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.common import CLICKHOUSE_POOL, OWNER, column_schema_metadata
from ooni_pipeline.detector import sql
from ooni_pipeline.detector.announce import pending
from ooni_pipeline.detector.cusum import CusumParams
from ooni_pipeline.detector.events import (
    EventParams,
    blocking_episodes,
    reconcile,
    shutdown_episodes,
)
from ooni_pipeline.detector.feeds import COUNTRY_CODE, build_feed, feed_key
from ooni_pipeline.detector.status import (
    StatusRun,
    hour_number,
    hour_text,
    query_frame,
    run_status,
)
from ooni_pipeline.fastpath.assets import FASTPATH_KEY
from ooni_pipeline.object_store import ObjectStoreResource
from ooni_pipeline.object_store.stores import ObjectStore
from ooni_pipeline.operations.alerts import post_alert

BLOCKING_STATUS_KEY = dg.AssetKey("blocking_status")
BLOCKING_EVENTS_KEY = dg.AssetKey("blocking_events")
CITIZENLAB_KEY = dg.AssetKey("citizenlab")
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
        description="domains watched besides the test lists' global social-networking ones",
    )
    categories: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CATEGORIES),
        description="citizenlab category codes of the global list (cc ZZ) that are watched",
    )
    mu0: float = Field(default=0.0, description="CUSUM: expected blocked share when OK")
    mu1: float = Field(default=0.7, description="CUSUM: expected blocked share when blocked")
    edd: float = Field(
        default=10.0, gt=0, description="CUSUM: expected detection delay; h = edd*(mu1-mu0)/2"
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

    def cusum(self) -> CusumParams:
        return CusumParams(
            mu0=self.mu0,
            mu1=self.mu1,
            edd=self.edd,
            gap_halflife_hours=self.gap_halflife_hours,
            forget_after_hours=self.forget_after_hours,
        )

    def events(self) -> EventParams:
        return EventParams(
            baseline_hours=self.shutdown_baseline_hours,
            min_hourly=self.shutdown_min_hourly,
            silent_hours=self.shutdown_silent_hours,
            coverage_share=self.coverage_share,
            announce_within_hours=self.announce_within_hours,
        )


def watchlist(ch: ClickHouse, config: BlockingDetectorConfig) -> list[str]:
    """The watched domains: the global test list's rows of the configured categories
    (OONI's detector: ``GRP``), plus ``extra_domains``."""
    rows = ch.query_rows(
        sql.WATCHLIST_SQL, {"categories": list(config.categories), "cc": GLOBAL_LIST_CC}
    )
    domains = {str(domain) for (domain,) in rows}
    domains |= {d.strip().lower() for d in config.extra_domains if d.strip()}
    return sorted(domains)


_EVENT_TYPES = {
    "event_id": "object",
    "kind": "object",
    "probe_cc": "object",
    "domain": "object",
    "status": "object",
    "onset": "object",
    "start_hour": "datetime64[ns]",
    "end_hour": "datetime64[ns]",
    "networks": "object",
    "peak_networks": "int64",
    "explorer_url": "object",
    "first_detected": "datetime64[ns]",
    "updated": "datetime64[ns]",
    "announced": "object",
    "version": "datetime64[ns]",
}


def read_events(ch: ClickHouse, query: str, params: dict[str, Any]) -> pd.DataFrame:
    """Stored events with hours as numbers (``start``, ``end``; ONGOING when open)."""
    df = query_frame(ch, query, params, _EVENT_TYPES)
    df["start"] = (df["start_hour"].astype("int64") // 3_600_000_000_000).astype("int64")
    ended = df["end_hour"].notna()
    df["end"] = -1
    df.loc[ended, "end"] = df.loc[ended, "end_hour"].astype("int64") // 3_600_000_000_000
    df["end"] = df["end"].astype("int64")
    return df.drop(columns=["start_hour", "end_hour", "version"])


def write_events(ch: ClickHouse, rows: pd.DataFrame, version: datetime) -> None:
    if rows.empty:
        return
    out = rows.copy()
    out["start_hour"] = pd.to_datetime(out["start"] * 3600, unit="s")
    out["end_hour"] = pd.to_datetime(out["end"].where(out["end"] >= 0) * 3600, unit="s")
    out["version"] = pd.Timestamp(version)
    out["networks"] = out["networks"].map(lambda asns: [int(a) for a in asns])
    ch.insert_df("blocking_events", out[list(sql.EVENT_COLUMNS)])


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
                "stopped; Atom feeds at `feeds/blocking/<CC>.atom` and "
                "`feeds/blocking/global.atom`; a chat message per new, ended or withdrawn event."
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
    window = context.partition_time_window
    first = hour_number(window.start)
    last = hour_number(window.end) - 1
    cusum, event_params = config.cusum(), config.events()
    version = datetime.now(UTC).replace(tzinfo=None)
    store = object_store.get_store()
    with clickhouse.connect() as ch:
        ensure_tables(ch, "fastpath", "citizenlab", "blocking_status", "blocking_events")
        domains = watchlist(ch, config)
        if not domains:
            context.log.warning(
                "the watchlist is empty: materialize citizenlab, or set extra_domains"
            )
        status = run_status(ch, first, last, domains, cusum, version)
        context.log.info(
            f"detected hours {hour_text(status.first_hour)} .. {hour_text(status.last_hour)} "
            f"({status.hours} h, {status.rows} rows) in {status.duration_s:.1f} s"
        )
        outcome = update_events(ch, status, event_params, version)
        announced = announce(context, ch, outcome, status.last_hour, event_params, version)
        feeds = write_feeds(store, outcome["all"], outcome["touched"], version)
        schema_status = column_schema_metadata(ch, "blocking_status")
        schema_events = column_schema_metadata(ch, "blocking_events")
    yield dg.MaterializeResult(
        asset_key=BLOCKING_STATUS_KEY,
        metadata={
            **status_metadata(status, domains, cusum),
            **schema_status,
        },
    )
    yield dg.MaterializeResult(
        asset_key=BLOCKING_EVENTS_KEY,
        metadata={
            "events_written": len(outcome["written"]),
            "events_ongoing": int((outcome["all"]["status"] == "ongoing").sum()),
            "events_withdrawn_now": _count(outcome["written"], "withdrawn"),
            "messages_posted": announced,
            "feeds_written": dg.MetadataValue.json(feeds),
            "parameters": dg.MetadataValue.json(event_params.as_metadata()),
            **schema_events,
        },
    )


def _count(events: pd.DataFrame, status: str) -> int:
    return int((events["status"] == status).sum()) if len(events) else 0


def status_metadata(status: StatusRun, domains: list[str], params: CusumParams) -> dict[str, Any]:
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


def update_events(
    ch: ClickHouse, status: StatusRun, params: EventParams, version: datetime
) -> dict[str, Any]:
    """Group the hours a detector pass wrote into events, reconcile them with the
    stored ones and write what changed."""
    stored = read_events(ch, sql.EVENTS_FROM_SQL, {"start": hour_text(status.first_hour)})
    active = stored[stored["status"] != "withdrawn"]
    begin = min([status.first_hour, *active["start"].tolist()])
    runs = query_frame(
        ch,
        sql.BLOCKING_EPISODES_SQL,
        {"start": hour_text(begin), "end": hour_text(status.last_hour)},
        {
            "probe_cc": "object",
            "domain": "object",
            "start": "int64",
            "last": "int64",
            "onset_up": "bool",
            "peak_networks": "int64",
            "networks": "object",
        },
    )
    volume = query_frame(
        ch,
        sql.COUNTRY_VOLUME_SQL,
        {
            "start": hour_text(begin - params.baseline_hours),
            "end": hour_text(status.last_hour + 1),
        },
        {"hour": "int64", "probe_cc": "object", "measurements": "int64"},
    )
    episodes = pd.concat(
        [
            blocking_episodes(runs, status.last_hour),
            shutdown_episodes(volume, begin, status.last_hour, params),
        ],
        ignore_index=True,
    )
    written = reconcile(episodes, stored, version)
    write_events(ch, written, version)
    everything = read_events(ch, sql.ALL_EVENTS_SQL, {})
    touched = set(written["probe_cc"]) if len(written) else set()
    return {"written": written, "all": everything, "touched": touched}


def announce(
    context: dg.AssetExecutionContext,
    ch: ClickHouse,
    outcome: dict[str, Any],
    last_hour: int,
    params: EventParams,
    version: datetime,
) -> int:
    """Post each pending message, recording each one sent; a failure to post fails
    the run after the others are recorded (the next run sends it again)."""
    events = outcome["all"]
    todo = pending(events.to_dict("records"), last_hour, params)
    webhook_url = settings.env("OONI_ALERT_WEBHOOK_URL")
    by_id = events.set_index("event_id")
    done: list[str] = []
    failure: Exception | None = None
    posted = 0
    for item in todo:
        if item.text is not None:
            if webhook_url:
                try:
                    post_alert(webhook_url, item.text)
                except RuntimeError as exc:
                    failure = exc
                    continue
                posted += 1
            else:
                context.log.info(f"OONI_ALERT_WEBHOOK_URL unset; event message: {item.text}")
        done.append(item.event_id)
        by_id.loc[item.event_id, "announced"] = item.status
    if done:
        rows = by_id.loc[done].reset_index()
        write_events(ch, rows, version)
        outcome["all"] = by_id.reset_index()
    if failure is not None:
        raise failure
    return posted


def write_feeds(
    store: ObjectStore, events: pd.DataFrame, touched: set[str], generated: datetime
) -> list[str]:
    """The global feed and the feeds of the countries whose events changed."""
    keys = [feed_key(None)]
    store.put_bytes(keys[0], build_feed(events, None, generated))
    for cc in sorted(touched):
        if not COUNTRY_CODE.match(str(cc)):
            continue
        key = feed_key(cc)
        store.put_bytes(key, build_feed(events, cc, generated))
        keys.append(key)
    return keys
