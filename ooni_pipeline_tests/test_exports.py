"""The website-metrics export on real chdb, both object stores, read back with csv and pandas."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import threading
import time
from datetime import datetime

import dagster as dg
import pandas as pd
import pytest

from ooni_pipeline.clickhouse import ClickHouse, ClickHouseError
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.exports.definitions import website_metrics_schedule
from ooni_pipeline.exports.engine_file import engine_file
from ooni_pipeline.exports.website_metrics import (
    CSV_COLUMNS,
    object_key,
    website_metrics,
    website_metrics_object_check,
)
from ooni_pipeline_tests.rig import bomb, failure_text, materialization_metadata

DAY = "2024-03-10"


def _msm(uid: str, start: str, **fields) -> dict:
    row = {
        "measurement_uid": uid,
        "report_id": f"r-{uid}",
        "input": f"https://{uid}.example.org/",
        "domain": f"{uid}.example.org",
        "probe_cc": "IT",
        "probe_asn": 30722,
        "test_name": "web_connectivity",
        "measurement_start_time": datetime.fromisoformat(start),
        "test_start_time": datetime.fromisoformat(start),
        "anomaly": "f",
        "confirmed": "f",
        "msm_failure": "f",
        "blocking_type": "",
    }
    row.update(fields)
    return row


def _insert(ch: ClickHouse, rows: list[dict]) -> None:
    ensure_tables(ch, "fastpath")
    ch.insert_df("fastpath", pd.DataFrame(rows))


# (uid, start, fields, expected category)
CASES = [
    ("u01", f"{DAY} 00:00:00", {}, "accessible"),
    ("u02", f"{DAY} 01:00:00", {"anomaly": "t", "blocking_type": "dns"}, "dns"),
    ("u03", f"{DAY} 02:00:00", {"anomaly": "t", "blocking_type": "tcp_ip"}, "tcp_ip"),
    ("u04", f"{DAY} 03:00:00", {"anomaly": "t", "blocking_type": "http-diff"}, "http-diff"),
    (
        "u05",
        f"{DAY} 04:00:00",
        {"anomaly": "t", "blocking_type": "http-failure", "confirmed": "t"},
        "http-failure",
    ),
    ("u06", f"{DAY} 05:00:00", {"anomaly": "t", "blocking_type": ""}, "anomaly"),
    ("u07", f"{DAY} 06:00:00", {"anomaly": "t", "blocking_type": "weird"}, "anomaly"),
    (
        "u08",
        f"{DAY} 07:00:00",
        {"msm_failure": "t", "anomaly": "t", "blocking_type": "dns"},
        "failure",
    ),
    ("u09", f"{DAY} 08:00:00", {"anomaly": "f", "blocking_type": "dns"}, "accessible"),
    (
        "u10",
        f"{DAY} 09:00:00",
        {
            "input": 'https://ex.org/a,b?q="quoted"&x=ü',
            "domain": "ex.org",
            "probe_cc": "DE",
            "probe_asn": 3320,
        },
        "accessible",
    ),
    ("u11", f"{DAY} 23:59:59", {"confirmed": "t", "anomaly": "t", "blocking_type": "dns"}, "dns"),
    # Same second as u01: ordered by explorer_url after the time.
    ("u00", f"{DAY} 00:00:00", {"probe_cc": "IR", "probe_asn": 197207}, "accessible"),
]


@pytest.fixture
def day_rows(ch: ClickHouse) -> None:
    rows = [_msm(uid, start, **fields) for uid, start, fields, _ in CASES]
    # Excluded: another test, the day before, the next day at midnight.
    rows += [
        _msm("x1", f"{DAY} 12:00:00", test_name="telegram"),
        _msm("x2", "2024-03-09 23:59:59"),
        _msm("x3", "2024-03-11 00:00:00"),
    ]
    _insert(ch, rows)
    # A newer version of u02 (a separate insert: unmerged duplicate, later update_time).
    _insert(
        ch, [_msm("u02", f"{DAY} 01:00:00", anomaly="t", blocking_type="tcp_ip", confirmed="t")]
    )


def _expected() -> list[dict[str, str]]:
    rows = []
    for uid, start, fields, category in CASES:
        m = _msm(uid, start, **fields)
        confirmed = m["confirmed"] == "t"
        if uid == "u02":
            category, confirmed = "tcp_ip", True
        row = {
            "measurement_start_time": start,
            "probe_asn": str(m["probe_asn"]),
            "input": m["input"],
            "domain": m["domain"],
            "explorer_url": f"https://explorer.ooni.org/m/{uid}",
            "probe_cc": m["probe_cc"],
        }
        for c in ("accessible", "dns", "tcp_ip", "http-diff", "http-failure", "anomaly", "failure"):
            row[c] = "1" if c == category else "0"
        row["confirmed"] = "1" if confirmed else "0"
        rows.append(row)
    return sorted(rows, key=lambda r: (r["measurement_start_time"], r["explorer_url"]))


def _materialize(
    clickhouse, store_resource, partition_key=None, instance=None, tags=None, config=None
):
    return dg.materialize(
        [website_metrics, website_metrics_object_check],
        resources={"clickhouse": clickhouse, "object_store": store_resource},
        partition_key=partition_key,
        instance=instance or dg.DagsterInstance.ephemeral(),
        tags=tags,
        run_config={"ops": {"website_metrics": {"config": config}}} if config else None,
        raise_on_error=False,
    )


def _read(store, key: str) -> list[dict[str, str]]:
    text = gzip.decompress(store.read_bytes(key)).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def test_an_empty_or_halved_source_never_replaces_a_published_day(
    clickhouse, ch, s3_store_resource, day_rows
) -> None:
    """A wrong database or an empty embedded directory looks like a day with no rows:
    the published object stays, the run fails naming both counts; force overrides."""
    instance = dg.DagsterInstance.ephemeral()
    assert _materialize(clickhouse, s3_store_resource, DAY, instance).success
    store = s3_store_resource.get_store()
    published = store.read_bytes(object_key(DAY))

    ch.command("TRUNCATE TABLE fastpath")
    empty = _materialize(clickhouse, s3_store_resource, DAY, instance)
    assert not empty.success
    assert f"{DAY}: 0 rows would replace the {len(CASES)} published" in failure_text(empty)
    assert "force: true" in failure_text(empty)
    assert store.read_bytes(object_key(DAY)) == published

    # Without a record of what was published (a new Dagster instance), an existing
    # object is still never replaced by an empty export.
    fresh = _materialize(clickhouse, s3_store_resource, DAY, dg.DagsterInstance.ephemeral())
    assert "an empty export would replace the published object" in failure_text(fresh)
    assert store.read_bytes(object_key(DAY)) == published

    # Under half the published rows is refused; half or more is a normal re-export.
    kept = [_msm(uid, start, **fields) for uid, start, fields, _ in CASES]
    _insert(ch, kept[:5])
    assert "5 rows would replace the 12" in failure_text(
        _materialize(clickhouse, s3_store_resource, DAY, instance)
    )
    _insert(ch, kept[5:6])
    assert _materialize(clickhouse, s3_store_resource, DAY, instance).success
    assert len(_read(store, object_key(DAY))) == 6

    ch.command("TRUNCATE TABLE fastpath")
    forced = _materialize(clickhouse, s3_store_resource, DAY, instance, config={"force": True})
    assert forced.success
    assert _read(store, object_key(DAY)) == []


def test_exact_csv_in_both_stores(clickhouse, object_store_resource, day_rows) -> None:
    result = _materialize(clickhouse, object_store_resource, DAY)
    assert result.success
    data = object_store_resource.get_store().read_bytes(object_key(DAY))
    text = gzip.decompress(data).decode("utf-8")
    records = list(csv.DictReader(io.StringIO(text, newline="")))
    assert tuple(csv.reader(io.StringIO(text)).__next__()) == CSV_COLUMNS
    assert records == _expected()

    df = pd.read_csv(io.BytesIO(data), compression="gzip", keep_default_na=False)
    assert list(df.columns) == list(CSV_COLUMNS)
    assert df["tcp_ip"].sum() == 2 and df["dns"].sum() == 1 and df["confirmed"].sum() == 3
    assert (
        df[["accessible", "dns", "tcp_ip", "http-diff", "http-failure", "anomaly", "failure"]].sum(
            axis=1
        )
        == 1
    ).all()
    assert (
        df.loc[df.explorer_url.str.endswith("u10"), "input"].item()
        == 'https://ex.org/a,b?q="quoted"&x=ü'
    )

    # Recorded as it was published, then again by the step's end: the same figures.
    published, event = result.get_asset_materialization_events()
    meta = {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
    assert published.partition == event.partition == DAY
    assert {
        k: getattr(v, "value", v) for k, v in published.materialization.metadata.items()
    }.items() <= meta.items()
    assert meta["dagster/row_count"] == len(CASES)
    assert (
        meta["total_accessible"] == 4 and meta["total_anomaly"] == 2 and meta["total_failure"] == 1
    )
    assert meta["bytes"] == len(data)
    assert meta["countries"] == 3
    assert "explorer.ooni.org/m/u00" in meta["preview"]
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.metadata


def test_empty_day_is_a_header_only_csv(clickhouse, local_store_resource, ch) -> None:
    result = _materialize(clickhouse, local_store_resource, "2016-01-01")
    assert result.success
    text = gzip.decompress(
        local_store_resource.get_store().read_bytes(object_key("2016-01-01"))
    ).decode()
    assert text == ",".join(CSV_COLUMNS) + "\n"
    df = pd.read_csv(io.StringIO(text))
    assert list(df.columns) == list(CSV_COLUMNS) and len(df) == 0


def test_check_compares_with_what_was_exported_not_with_live_data(
    clickhouse, local_store_resource, ch, day_rows
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _materialize(clickhouse, local_store_resource, DAY, instance).success
    _insert(ch, [_msm("late", f"{DAY} 10:00:00")])  # a late upload
    context = dg.build_asset_check_context(
        resources={"clickhouse": clickhouse, "object_store": local_store_resource},
        instance=instance,
    )
    # The object is still what was exported: the check passes and reports the change.
    moved = website_metrics_object_check(context)
    assert moved.passed
    assert moved.metadata["days_whose_fastpath_changed_since_export"].value == [DAY]

    # A broken object (one row lost) fails it.
    store = local_store_resource.get_store()
    lines = gzip.decompress(store.read_bytes(object_key(DAY))).splitlines(keepends=True)
    store.put_bytes(object_key(DAY), gzip.compress(b"".join(lines[:-1])))
    broken = website_metrics_object_check(context)
    assert not broken.passed
    assert "is not the object its export wrote" in broken.metadata["problems"].value

    assert _materialize(clickhouse, local_store_resource, DAY, instance).success
    df = pd.read_csv(io.BytesIO(store.read_bytes(object_key(DAY))), compression="gzip")
    assert len(df) == len(CASES) + 1
    fresh = website_metrics_object_check(context)
    assert fresh.passed
    assert fresh.metadata["days_whose_fastpath_changed_since_export"].value == []


def test_object_check_reads_a_bomb_no_further_than_the_recorded_size(
    clickhouse, s3_store_resource, s3_client, s3_bucket, ch, day_rows
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(clickhouse, s3_store_resource, DAY, instance)
    assert result.success
    recorded = materialization_metadata(result, "website_metrics")["bytes"]
    store = s3_store_resource.get_store()
    header, row = gzip.decompress(store.read_bytes(object_key(DAY))).splitlines(keepends=True)[:2]
    # The object replaced in the bucket by 64 MiB of valid rows in about 300 KB of gzip.
    body = bomb("gzip", 64 << 20, header, row)
    s3_client.put_object(Bucket=s3_bucket, Key=object_key(DAY), Body=body)
    context = dg.build_asset_check_context(
        resources={"clickhouse": clickhouse, "object_store": s3_store_resource},
        instance=instance,
    )
    checked = website_metrics_object_check(context)
    assert not checked.passed
    problems = checked.metadata["problems"].value
    assert f"{DAY}: {object_key(DAY)} is not the object its export wrote " in problems
    assert f"({recorded + 1} or more bytes" in problems
    assert store.read_bytes(object_key(DAY)) == body  # a check reads, never writes


def test_failure_keeps_the_previous_object(clickhouse, s3_store_resource, ch, day_rows) -> None:
    assert _materialize(clickhouse, s3_store_resource, DAY).success
    store = s3_store_resource.get_store()
    before = store.read_bytes(object_key(DAY))
    ch.command("RENAME TABLE fastpath TO fastpath_away")
    ch.command(
        "CREATE TABLE fastpath (measurement_uid String) ENGINE = MergeTree ORDER BY measurement_uid"
    )
    result = _materialize(clickhouse, s3_store_resource, DAY)
    assert not result.success
    assert store.read_bytes(object_key(DAY)) == before


def test_partition_range_run_writes_one_object_per_day(
    clickhouse, local_store_resource, day_rows
) -> None:
    result = _materialize(
        clickhouse,
        local_store_resource,
        tags={
            "dagster/asset_partition_range_start": "2024-03-09",
            "dagster/asset_partition_range_end": "2024-03-11",
        },
    )
    assert result.success
    store = local_store_resource.get_store()
    assert store.list_keys("exports/website_metrics/") == [
        object_key(d) for d in ("2024-03-09", "2024-03-10", "2024-03-11")
    ]
    # Each day's materialization carries that day's own figures.
    rows = {
        e.partition: e.materialization.metadata["dagster/row_count"].value
        for e in result.get_asset_materialization_events()
    }
    assert rows == {"2024-03-09": 1, "2024-03-10": len(CASES), "2024-03-11": 1}
    shas = {
        e.partition: e.materialization.metadata["sha256"].value
        for e in result.get_asset_materialization_events()
    }
    assert len(set(shas.values())) == 3
    assert all(check.passed for check in result.get_asset_check_evaluations())


def test_schedule_requests_yesterday() -> None:
    context = dg.build_schedule_context(scheduled_execution_time=datetime(2024, 3, 11, 1, 0))
    request = website_metrics_schedule(context)
    assert request.partition_key == "2024-03-10"
    assert website_metrics_schedule.cron_schedule == "0 1 * * *"


def test_check_fails_on_a_malformed_object_without_quoting_it(
    clickhouse, local_store_resource, ch, day_rows
) -> None:
    """An object replaced by a short row or a cell that is no count fails the check,
    which names the object and never echoes the hostile cell."""
    instance = dg.DagsterInstance.ephemeral()
    assert _materialize(clickhouse, local_store_resource, DAY, instance).success
    store = local_store_resource.get_store()
    header = (",".join(CSV_COLUMNS) + "\n").encode()
    context = dg.build_asset_check_context(
        resources={"clickhouse": clickhouse, "object_store": local_store_resource},
        instance=instance,
    )
    for body in (
        b'"2024-03-10 00:00:00",1,"i","d","u","IT",<b>pwned</b>,0,0,0,0,0,0,0\n',
        b'"2024-03-10 00:00:00",1,"i"\n',
    ):
        store.put_bytes(object_key(DAY), gzip.compress(header + body))
        checked = website_metrics_object_check(context)
        assert not checked.passed
        problems = checked.metadata["problems"].value
        assert f"{DAY}: {object_key(DAY)} is not the object its export wrote" in problems
        assert "pwned" not in problems


@pytest.mark.parametrize("fail", [False, True])
def test_a_file_becomes_the_object_only_when_complete(object_store_resource, fail) -> None:
    """``open_file_writer`` (for writers that need a path, like ClickHouse's file()):
    nothing under the key while the file is written, the previous object kept and
    the file removed on error."""
    store = object_store_resource.get_store()
    key = "exports/website_metrics/2024-03-10.csv.gz"
    store.put_bytes(key, b"published")
    staged = None
    with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
        with store.open_file_writer(key) as path:
            staged = path
            path.write_bytes(b"new object")
            assert store.read_bytes(key) == b"published"
            assert store.list_keys("exports/") == [key]
            if fail:
                raise RuntimeError("the engine failed")
    assert store.read_bytes(key) == (b"published" if fail else b"new object")
    assert not staged.exists()
    assert store.list_keys("exports/") == [key]


FOLLOWED_SQL = "SELECT number, toString(number * 7) FROM numbers(3000000)"
FOLLOWED_CSV = b"".join(b'%d,"%d"\n' % (n, n * 7) for n in range(3_000_000))


def _engine_file_running() -> bool:
    return any(t.name.startswith("engine_file ") for t in threading.enumerate())


def test_a_reader_reads_the_file_while_the_engine_writes_it(ch, local_store_resource) -> None:
    """The reader starts on the first bytes, long before the engine has written the
    last, and still reads the whole file: what becomes the object."""
    store = local_store_resource.get_store()
    seen: dict[str, bool] = {}

    def reader(source) -> bytes:
        with gzip.GzipFile(fileobj=source) as unpacked:
            first = unpacked.read(1 << 16)
            seen["writer_running_at_first_bytes"] = _engine_file_running()
            return first + unpacked.read()

    key = "exports/followed.csv.gz"
    with engine_file(
        ch, store, key, FOLLOWED_SQL, {}, fmt="CSV", gzip_level=1, reader=reader
    ) as staged:
        assert staged.read == FOLLOWED_CSV
    assert gzip.decompress(store.read_bytes(key)) == FOLLOWED_CSV
    assert seen == {"writer_running_at_first_bytes": True}
    assert not _engine_file_running()


@pytest.mark.clickhouse_backends_except(
    "server-24.8",
    reason="before 25.11 a failure midway is data in the gzip stream, which the endpoint "
    "cannot append to the engine's cut one; test_an_old_servers_stream_failing_midway_"
    "is_never_published covers that server",
)
@pytest.mark.parametrize("failing", ["engine", "reader"])
def test_a_failure_while_the_file_is_read_keeps_the_published_object(
    ch, local_store_resource, failing
) -> None:
    """The engine failing midway raises its own error, not the reader's (whose cut
    file is a consequence); a reader failing waits for the engine to finish. Either way
    the published object stays as it was and nothing is left staged."""
    store = local_store_resource.get_store()
    key = "exports/followed.csv.gz"
    store.put_bytes(key, b"published")
    sql = FOLLOWED_SQL
    if failing == "engine":
        sql = "SELECT number, throwIf(number = 2000000) FROM numbers(3000000)"

    def reader(source) -> bytes:
        with gzip.GzipFile(fileobj=source) as unpacked:
            data = unpacked.read()  # a cut stream raises EOFError
        if failing == "reader" or data != FOLLOWED_CSV:
            raise ValueError("not the expected CSV")
        return data

    expected = ClickHouseError if failing == "engine" else ValueError
    with pytest.raises(expected):
        with engine_file(ch, store, key, sql, {}, fmt="CSV", gzip_level=1, reader=reader):
            pytest.fail("a failed file is never handed on")
    assert store.read_bytes(key) == b"published"
    assert store.list_keys("exports/") == [key]
    assert not _engine_file_running()


@pytest.mark.clickhouse_backends("server")
def test_a_server_compresses_the_export_itself(
    clickhouse, clickhouse_server, local_store_resource, day_rows
) -> None:
    """The CSV comes gzip-compressed by the server, at the configured level, and is
    stored as it arrives: no Python gzip on the way."""
    clickhouse_server.log.clear()
    result = _materialize(clickhouse, local_store_resource, DAY, config={"gzip_level": 2})
    assert result.success
    (export,) = [e for e in clickhouse_server.log if "http_zlib_compression_level" in e.params]
    assert export.content_encoding == "gzip"
    assert export.params["http_zlib_compression_level"] == "2"
    assert _read(local_store_resource.get_store(), object_key(DAY)) == _expected()


NEXT = "2024-03-11"
RANGE = {"dagster/asset_partition_range_start": DAY, "dagster/asset_partition_range_end": NEXT}


def _recorded(instance, day: str) -> dict:
    """Dagster's latest record of ``day``."""
    record = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=website_metrics.key, asset_partitions=[day]), limit=1
    ).records[0]
    return {k: getattr(v, "value", v) for k, v in record.asset_materialization.metadata.items()}


def _check_alone(instance, resources, tags: dict[str, str]) -> dg.AssetCheckEvaluation:
    """The object check run on its own, as the UI's *Execute check* and the CLI run
    it: a job of the check only, its run naming a partition or a range."""
    job = dg.define_asset_job(
        "check_only", selection=dg.AssetSelection.checks(website_metrics_object_check)
    )
    defs = dg.Definitions(
        assets=[website_metrics],
        asset_checks=[website_metrics_object_check],
        jobs=[job],
        resources=resources,
    )
    result = defs.resolve_job_def("check_only").execute_in_process(
        instance=instance, tags=tags, raise_on_error=False
    )
    assert result.success, result.all_events
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def test_a_run_failing_on_its_second_day_has_recorded_its_first(
    clickhouse, ch, moto_endpoint, s3_bucket, day_rows
) -> None:
    """A 2-day run whose second day cannot be written (the store refuses its
    object): the first day's new object, Dagster's latest record of it and its
    manifest entry agree, and the object check, run on its own for that day or for
    both, passes; the second day keeps its previous object and record."""
    from ooni_pipeline.exports.manifest import load_exports_manifest
    from ooni_pipeline.object_store import ObjectStoreResource
    from ooni_pipeline_tests.rig import FaultyProxy

    _insert(ch, [_msm("n1", f"{NEXT} 01:00:00"), _msm("n2", f"{NEXT} 02:00:00")])
    instance = dg.DagsterInstance.ephemeral()
    failing = {"on": False}
    proxy = FaultyProxy(
        moto_endpoint,
        lambda method, path: failing["on"] and method in ("PUT", "POST") and f"{NEXT}.csv" in path,
    )
    try:
        resource = ObjectStoreResource(
            bucket=s3_bucket, endpoint_url=proxy.url, region_name="us-east-1"
        )
        store = resource.get_store()
        assert _materialize(clickhouse, resource, None, instance, tags=RANGE).success
        second_before, second_recorded = (
            store.read_bytes(object_key(NEXT)),
            _recorded(instance, NEXT),
        )
        _insert(ch, [_msm("late", f"{DAY} 23:00:00"), _msm("n3", f"{NEXT} 03:00:00")])
        failing["on"] = True
        result = _materialize(clickhouse, resource, None, instance, tags=RANGE)
    finally:
        proxy.close()
    assert not result.success and proxy.failed
    import hashlib

    store = s3_store_for(moto_endpoint, s3_bucket).get_store()
    first = store.read_bytes(object_key(DAY))
    recorded = _recorded(instance, DAY)
    manifest = load_exports_manifest(store)
    assert (
        hashlib.sha256(first).hexdigest()
        == recorded["sha256"]
        == manifest[object_key(DAY)]["sha256"]
    )
    assert recorded["dagster/row_count"] == len(CASES) + 1 == len(_read(store, object_key(DAY)))
    assert store.read_bytes(object_key(NEXT)) == second_before
    assert _recorded(instance, NEXT) == second_recorded
    assert hashlib.sha256(second_before).hexdigest() == manifest[object_key(NEXT)]["sha256"]

    resources = {"clickhouse": clickhouse, "object_store": s3_store_for(moto_endpoint, s3_bucket)}
    one = _check_alone(instance, resources, {"dagster/partition": DAY})
    assert one.passed, one.metadata
    assert one.metadata["days_checked"].value == 1
    both = _check_alone(instance, resources, RANGE)
    assert both.passed and both.metadata["days_checked"].value == 2


def s3_store_for(endpoint: str, bucket: str):
    from ooni_pipeline.object_store import ObjectStoreResource

    return ObjectStoreResource(bucket=bucket, endpoint_url=endpoint, region_name="us-east-1")


def test_a_check_run_on_its_own_fails_on_a_replaced_object(
    clickhouse, local_store_resource, day_rows
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _materialize(clickhouse, local_store_resource, DAY, instance).success
    store = local_store_resource.get_store()
    store.put_bytes(object_key(DAY), gzip.compress(b"not the export\n"))
    resources = {"clickhouse": clickhouse, "object_store": local_store_resource}
    evaluation = _check_alone(instance, resources, {"dagster/partition": DAY})
    assert not evaluation.passed
    assert "is not the object its export wrote" in evaluation.metadata["problems"].value


@pytest.mark.clickhouse_backends("server")
def test_two_runs_of_one_day_leave_a_manifest_describing_the_object(
    clickhouse, ch, local_store_resource, day_rows, monkeypatch
) -> None:
    """Two runs of the same day at once (a backfill beside the automation, two
    hosts: two Dagster instances, one server). Both would publish before either
    records: a barrier before the manifest write lets the run whose object was
    replaced write last. The publishing lock keeps them in turn, so the manifest
    and each run's record describe the object under the key."""
    import hashlib

    import ooni_pipeline.exports.website_metrics as module
    from ooni_pipeline.exports.manifest import load_exports_manifest

    store = local_store_resource.get_store()
    barrier = threading.Barrier(2, timeout=5)
    record = module.record_exports

    def meeting_first(context, ch, store, entries):
        ((entry,),) = (objects.values() for objects in entries.values())
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()  # both objects published, neither recorded (without the lock)
            live = hashlib.sha256(store.read_bytes(object_key(DAY))).hexdigest()
            if live != entry["sha256"]:
                time.sleep(1)  # the replaced one records last
        record(context, ch, store, entries)

    monkeypatch.setattr(module, "record_exports", meeting_first)
    instances = [dg.DagsterInstance.ephemeral() for _ in range(2)]
    results = {}

    def run(level: int) -> None:
        results[level] = _materialize(
            clickhouse,
            local_store_resource,
            DAY,
            instances[level - 1],
            config={"gzip_level": level},
        )

    threads = [threading.Thread(target=run, args=(level,)) for level in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.success for r in results.values())
    live = hashlib.sha256(store.read_bytes(object_key(DAY))).hexdigest()
    manifest = load_exports_manifest(store)
    assert manifest[object_key(DAY)]["sha256"] == live
    # the run that published last has the object it recorded
    assert live in {_recorded(instance, DAY)["sha256"] for instance in instances}


@pytest.mark.clickhouse_backends("server")
def test_a_range_of_days_from_a_shell(clickhouse_server, ch, day_rows, tmp_path) -> None:
    """README's command for a range: ``dagster asset materialize --partition-range``
    with the project's dagster.yaml, in a process of its own, against the server:
    one run, one object per day, each day's record and its passed check."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from ooni_pipeline_tests.conftest import SERVER_DATABASE, SERVER_PASSWORD, SERVER_USER

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(Path(__file__).parents[1] / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "OONI_DATA_DIR": str(tmp_path / "ooni"),
        "OONI_CLICKHOUSE_URL": clickhouse_server.url(SERVER_USER, SERVER_PASSWORD, SERVER_DATABASE),
        "OONI_SCHEDULES_DEFAULT": "stopped",
    }
    for name in ("OONI_S3_BUCKET", "OONI_S3_ENDPOINT_URL", "OONI_WATCHLISTS"):
        env.pop(name, None)
    days = ("2024-03-09", DAY, NEXT)
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("dagster")), "asset", "materialize",
            "-m", "ooni_pipeline.definitions", "--select", "website_metrics",
            "--partition-range", f"{days[0]}...{days[-1]}",
        ],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    objects = tmp_path / "ooni" / "objects"
    assert sorted(p.name for p in (objects / "exports" / "website_metrics").iterdir()) == [
        f"{d}.csv.gz" for d in days
    ]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert {_recorded(instance, d)["fastpath_data_version"] for d in days}
        assert len(instance.get_runs()) == 1
        record = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(website_metrics.key, "website_metrics_object_check"), limit=1
        )[0]
        assert record.evaluation.passed and record.evaluation.metadata["days_checked"].value == 3


def test_a_manifest_write_failing_after_the_object_fails_the_check(
    clickhouse, ch, moto_endpoint, s3_bucket, day_rows
) -> None:
    """The store refuses the manifest after the day's object went up (found by
    review): the run fails, Dagster records the object as published, and the object
    check, which compares the manifest too, fails until a run writes it."""
    from ooni_pipeline_tests.rig import FaultyProxy

    instance = dg.DagsterInstance.ephemeral()
    direct = s3_store_for(moto_endpoint, s3_bucket)
    assert _materialize(clickhouse, direct, DAY, instance).success
    _insert(ch, [_msm("late", f"{DAY} 23:00:00")])
    proxy = FaultyProxy(
        moto_endpoint, lambda method, path: method == "PUT" and "exports/manifests/" in path
    )
    try:
        resource = s3_store_for(proxy.url, s3_bucket)
        failed = _materialize(clickhouse, resource, DAY, instance)
    finally:
        proxy.close()
    assert not failed.success and proxy.failed
    resources = {"clickhouse": clickhouse, "object_store": direct}
    check = _check_alone(instance, resources, {"dagster/partition": DAY})
    assert not check.passed
    assert "the manifest has sha256" in check.metadata["problems"].value
    assert _materialize(clickhouse, direct, DAY, instance).success
    assert _check_alone(instance, resources, {"dagster/partition": DAY}).passed
