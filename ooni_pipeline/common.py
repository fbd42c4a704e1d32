"""What every domain shares: pool, retries, owner, schedule defaults, metadata helpers."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import dagster as dg

from ooni_pipeline import settings
from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline.clickhouse.swap import RowBounds

if TYPE_CHECKING:
    from ooni_pipeline.fetch import Validators

# Every step that opens ClickHouse takes a slot of this pool. dagster.yaml limits it
# to 1 on the embedded default (chdb lets one process hold its directory).
CLICKHOUSE_POOL = "clickhouse"
OWNER = "team:ooni-backend"

# OONI's timers retried 3 times. A scheduled run that fails is retried by a later run,
# launched by ``operations.retries.delayed_retry_sensor`` 10, 30 and 70 minutes after
# the failure before it (docs/operations.md "Operations" states these figures; a test holds them
# equal). Not in the run (a step retry policy): a step waiting there for its retry
# keeps its run in progress, holding one of the instance's ``max_concurrent_runs``
# for up to 110 minutes, and exports and the detector queue behind it.
RETRY_WAITS_MIN = (10, 30, 70)
# Run tags: how many retries the run's job gets, and which try this run is (0 first).
MAX_RETRIES_TAG = "ooni/max_retries"
ATTEMPT_TAG = "ooni/attempt"
RETRY_OF_TAG = "ooni/retry_of"
RETRIED = {MAX_RETRIES_TAG: str(len(RETRY_WAITS_MIN))}
# A scheduled job whose next tick is its retry (run every hour or more often).
NOT_RETRIED = {MAX_RETRIES_TAG: "0"}
# A run in these states is still to do its work, or doing it.
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


# A run created longer ago than this and still not finished blocks nothing: its worker
# may be gone with its code server (it then stays STARTED until the next run of its
# lock marks it failed, docs/clickhouse.md), or it never left NOT_STARTED. The next
# run is let through, and its lock deals with the old one. Longer than any backfill
# run seen here; the asset's freshness policy turns FAIL long before.
STALE_IN_FLIGHT_S = 24 * 3600


def runs_in_flight(
    instance: dg.DagsterInstance, job_name: str, asset_keys: set[dg.AssetKey], now: float
) -> list[dg.DagsterRun]:
    """The runs queued or in progress of ``job_name`` or of any of ``asset_keys``
    (a run launched from the UI, a backfill's, a retry), created at most
    ``STALE_IN_FLIGHT_S`` before ``now`` (a Unix time)."""
    since = datetime.fromtimestamp(now - STALE_IN_FLIGHT_S, timezone.utc)
    return [
        record.dagster_run
        for record in instance.get_run_records(
            dg.RunsFilter(statuses=IN_FLIGHT, created_after=since)
        )
        if record.dagster_run.job_name == job_name
        or asset_keys & set(record.dagster_run.asset_selection or ())
    ]


# How long a run waits for another live run holding the same lock before it fails
# (and its retry, off the pool, tries again later): one updater's run takes minutes,
# and a waiting step holds a slot of the ``clickhouse`` pool.
LOCK_WAIT_S = 20 * 60


def run_liveness(context: dg.AssetExecutionContext) -> Callable[[str], bool | None]:
    """``alive(run_id)``: whether that run of this instance may still be working
    (its status is not final); ``None`` for a run this instance does not know."""

    def alive(run_id: str) -> bool | None:
        run = context.instance.get_run_by_id(run_id)
        return None if run is None else not run.is_finished

    return alive


def one_run_at_a_time(context: dg.AssetExecutionContext, ch: ClickHouse, name: str):
    """A context manager: this run holds the ClickHouse lock ``name`` (one updater,
    one staging table) for the block; another run of the same updater waits for it,
    and a lock left by a run that has ended, or whose worker process is gone, is
    taken over (that run is then marked failed: its worker cannot do it)."""
    from ooni_pipeline.clickhouse.lock import exclusive

    run_alive = run_liveness(context)

    def mark_failed(run_id: str) -> None:
        run = context.instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            context.instance.report_run_failed(
                run, f"its worker process is gone (found by run {context.run.run_id})"
            )

    return exclusive(
        ch,
        name,
        context.run.run_id,
        owner_alive=run_alive,
        on_dead_worker=mark_failed,
        wait_s=LOCK_WAIT_S,
        log=context.log,
    )


def publishing(
    context: dg.AssetExecutionContext, ch: ClickHouse, asset_key: dg.AssetKey, partition: str
):
    """A context manager: this run alone publishes ``asset_key``'s objects of
    ``partition`` and records them (Dagster, manifest) for the block. Two runs of
    one partition (a backfill beside the automation) take turns, so the manifest
    and Dagster's record always describe the object under the key, never the other
    run's; runs of other partitions do not wait."""
    name = re.sub(r"[^0-9A-Za-z_]", "_", f"publish_{asset_key.to_user_string()}_{partition}")
    if len(name) > 100:  # a lock table's name stays a valid identifier
        name = f"publish_{hashlib.sha256(name.encode()).hexdigest()[:32]}"
    return one_run_at_a_time(context, ch, name)


def record_partition(
    context: dg.AssetExecutionContext,
    asset_key: dg.AssetKey,
    partition: str,
    metadata: dict[str, Any],
) -> None:
    """Dagster's record of one partition whose objects were just published, logged
    at once: a run that fails (or is killed) on a later partition has recorded every
    object it published. The step's own materialization at its end repeats the same
    figures (``add_asset_metadata``), so both records agree."""
    context.log_event(
        dg.AssetMaterialization(asset_key=asset_key, partition=partition, metadata=metadata)
    )
    context.add_asset_metadata(metadata, asset_key=asset_key, partition_key=partition)


class ShrinkRefusedError(RuntimeError):
    """A result much smaller than what is published would have replaced it."""


def shrink_refusal(what: str, published: int | None, new: int, unit: str = "rows") -> str | None:
    """Why ``new`` rows may not replace ``published`` ones (``None`` if they may).

    An empty result never replaces a non-empty one, nor does one under half of it:
    a wrong database URL or an empty embedded directory looks exactly like that, and
    the run would otherwise be green. ``force: true`` in the run config overrides.
    """
    if published and new < published / 2:
        return f"{what}: {new} {unit} would replace the {published} published"
    return None


def raise_refusals(refusals: list[str]) -> None:
    if refusals:
        raise ShrinkRefusedError(
            "; ".join(refusals) + ". Nothing was replaced there. If the smaller result is "
            "right (data deleted at the source), rerun with `force: true` in the run config."
        )


def table_schema(ch: ClickHouse, table: str) -> dg.TableSchema:
    """The table's columns as Dagster shows them."""
    return dg.TableSchema(
        columns=[dg.TableColumn(name, type_) for name, type_ in ch.columns(table)]
    )


def column_schema_metadata(ch: ClickHouse, table: str) -> dict[str, Any]:
    return {"dagster/column_schema": table_schema(ch, table)}


def last_metadata(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext,
    key: dg.AssetKey,
    partition_key: str | None = None,
) -> dict[str, Any]:
    """Raw values of the metadata of the asset's latest materialization, of one
    partition if given ({} if none)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=key, asset_partitions=[partition_key] if partition_key else None
        ),
        limit=1,
    ).records
    if not records or records[0].asset_materialization is None:
        return {}
    return {
        name: getattr(value, "value", value)
        for name, value in records[0].asset_materialization.metadata.items()
    }


def checked_partitions(
    context: dg.AssetCheckExecutionContext,
    key: dg.AssetKey,
    partitions_def: dg.PartitionsDefinition,
) -> list[str]:
    """The partitions a check verifies: those of its run (a materialization with its
    checks, or the check run on its own for one partition or a range, as the UI's
    *Execute check* and the CLI do), else the one its asset last materialized.

    A check run on its own is not a partitioned step even when its run names
    partitions (its context's ``partition_keys`` raises), so the run's tags are read."""
    from dagster._core.errors import DagsterInvalidPropertyError
    from dagster._core.storage.tags import (
        ASSET_PARTITION_RANGE_END_TAG,
        ASSET_PARTITION_RANGE_START_TAG,
        PARTITION_NAME_TAG,
    )

    try:
        tags = context.run.tags
    except DagsterInvalidPropertyError:  # invoked directly, without a run
        tags = {}
    start, end = tags.get(ASSET_PARTITION_RANGE_START_TAG), tags.get(ASSET_PARTITION_RANGE_END_TAG)
    if start and end:
        return list(partitions_def.get_partition_keys_in_range(dg.PartitionKeyRange(start, end)))
    if tags.get(PARTITION_NAME_TAG):
        return [tags[PARTITION_NAME_TAG]]
    event = context.instance.get_latest_materialization_event(key)
    return [event.dagster_event.partition] if event and event.dagster_event else []


SCHEDULE_STATES = ("running", "stopped")


def schedules_start_running() -> bool:
    """``OONI_SCHEDULES_DEFAULT`` (read when the code location loads): ``stopped`` starts
    every schedule, and the sensor that launches re-exports, stopped, so that a staging
    copy or a test server runs nothing on its own until someone switches one on;
    ``running`` (default) leaves each at its own default. A status switched in the UI
    is stored by Dagster and outlives this default either way."""
    value = (settings.env("OONI_SCHEDULES_DEFAULT") or "running").lower()
    if value not in SCHEDULE_STATES:
        raise ValueError(f"OONI_SCHEDULES_DEFAULT must be one of {SCHEDULE_STATES}, got {value!r}")
    return value == "running"


def schedule_status(running: bool = True) -> dg.DefaultScheduleStatus:
    """A schedule's default status: ``running``, unless ``OONI_SCHEDULES_DEFAULT=stopped``."""
    on = running and schedules_start_running()
    return dg.DefaultScheduleStatus.RUNNING if on else dg.DefaultScheduleStatus.STOPPED


def launching_sensor_status() -> dg.DefaultSensorStatus:
    """A sensor that launches runs starts as the schedules do (the failure alert
    launches none: it stays on)."""
    on = schedules_start_running()
    return dg.DefaultSensorStatus.RUNNING if on else dg.DefaultSensorStatus.STOPPED


def asset_schedule(
    name: str,
    selection: dg.AssetSelection | list[Any],
    cron_schedule: str,
    *,
    retry: bool = True,
    description: str | None = None,
) -> dg.ScheduleDefinition:
    """The schedule ``<name>_schedule`` running job ``<name>_job``, in UTC, on by default
    (unless ``OONI_SCHEDULES_DEFAULT=stopped``).

    A tick skips while a run of the job, or of one of its assets, is queued or in
    progress: during an upstream outage failed runs do not pile up behind each other.
    With ``retry`` (default) a failed run is retried by later runs
    (``RETRY_WAITS_MIN``); without, the next tick is the retry (for jobs run every
    hour or more often), and only the first failure of a streak is alerted. A run
    launched from an asset's page, or by a test, fails at once. Missed
    ticks are not replayed (the daemon only runs the latest), so a stopped daemon
    does not cause a pile-up.
    """
    job = dg.define_asset_job(
        name=f"{name}_job",
        selection=selection,
        tags=RETRIED if retry else NOT_RETRIED,
        description=description,
    )
    assets = dg.AssetSelection.from_coercible(selection)

    @dg.schedule(
        name=f"{name}_schedule",
        job=job,
        cron_schedule=cron_schedule,
        execution_timezone="UTC",
        default_status=schedule_status(),
        description=description,
    )
    def _schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        repository = context.repository_def
        keys = set(assets.resolve(repository.asset_graph)) if repository else set()
        now = context.scheduled_execution_time or datetime.now(timezone.utc)
        busy = runs_in_flight(context.instance, job.name, keys, now.timestamp())
        if busy:
            return dg.SkipReason(
                f"run {busy[0].run_id} of these assets is {busy[0].status.value.lower()}: "
                "this tick starts none beside it"
            )
        return dg.RunRequest()

    return _schedule


def previous_validators(context: dg.AssetExecutionContext, key: dg.AssetKey) -> Validators | None:
    """The ETag / Last-Modified recorded by the asset's last rewrite, with the URL
    they came from, for a conditional GET of that URL only."""
    from ooni_pipeline.fetch import Validators

    meta = last_metadata(context, key)
    etag, last_modified = meta.get("source_etag") or None, meta.get("source_last_modified") or None
    url = meta.get("source_url") or None
    return Validators(etag, last_modified, url) if url and (etag or last_modified) else None


def validators_metadata(validators: Validators) -> dict[str, str]:
    """Metadata recording a source version (read back by ``previous_validators``)."""
    return {
        "source_url": validators.url or "",
        "source_etag": validators.etag or "",
        "source_last_modified": validators.last_modified or "",
    }


class TableUpdateConfig(dg.Config):
    """Run config of the table updaters: the new table's sanity bounds (exclusive:
    more than ``min_rows_exclusive``, fewer than ``max_rows_exclusive``; outside them
    the run fails before any swap), and ``force`` to rewrite an unchanged source."""

    min_rows_exclusive: int = 0
    max_rows_exclusive: int = 1_000_000_000
    force: bool = False

    def bounds(self) -> RowBounds:
        return RowBounds(self.min_rows_exclusive, self.max_rows_exclusive)


def unchanged_result(
    context: dg.AssetExecutionContext, version: str, reason: str, live_rows: int, **metadata: Any
) -> dg.MaterializeResult:
    """The materialization of an update skipped because its source did not change."""
    context.log.info(f"{reason} ({version}): rewrite skipped")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "skipped": True,
            "skip_reason": reason,
            "dagster/row_count": live_rows,
            **metadata,
        },
    )
