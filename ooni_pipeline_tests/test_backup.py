"""The database backup on real chdb, the moto S3 server and a local directory."""

from __future__ import annotations

import csv
import io
import json
import tempfile

import dagster as dg
import pytest
import zstandard

from ooni_pipeline.backup.assets import build_backup_asset
from ooni_pipeline.backup.definitions import backup_schedule
from ooni_pipeline.backup.plan import MANIFEST_KEY, BackupTable, parse_tables
from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.object_store import ObjectStoreResource
from ooni_pipeline_tests.rig import (
    FaultyProxy,
    PeakFileSize,
    bomb,
    failure_text,
    materialization_metadata,
)

FASTPATH = BackupTable("fastpath", "measurement_start_time")
fastpath_backup, fastpath_restore_check = build_backup_asset(FASTPATH)
asnmeta_backup, asnmeta_restore_check = build_backup_asset(BackupTable("asnmeta"))
FAST = {"pause_between_chunks_s": 0.0, "chunk_attempts": 1}


def _fill_fastpath(ch: ClickHouse, months: dict[str, int], random_chars: int = 0) -> None:
    """``months``: 'YYYY-MM' -> rows, spread over the month's first days."""
    ensure_tables(ch, "fastpath")
    for month, rows in months.items():
        ch.command(
            """
            INSERT INTO fastpath (measurement_uid, report_id, input, probe_cc, probe_asn, test_name,
                measurement_start_time, anomaly, confirmed, msm_failure, blocking_type, scores)
            SELECT concat({m:String}, '-', toString(number)), 'r', concat('https://x.org/"q",', toString(number)),
                'IT', 3269, 'web_connectivity',
                toDateTime(concat({m:String}, '-01 00:00:00'), 'UTC') + toIntervalSecond(number * 7),
                'f', 'f', 'f', '', randomPrintableASCII({n:UInt64})
            FROM numbers({rows:UInt64})
            """,
            {"m": month, "rows": rows, "n": random_chars},
        )


def _run(clickhouse, store_resource, assets, config=FAST, instance=None):
    ops = {a.op.name: {"config": config} for a in assets if isinstance(a, dg.AssetsDefinition)}
    return dg.materialize(
        list(assets),
        resources={"clickhouse": clickhouse, "object_store": store_resource},
        run_config={"ops": ops},
        instance=instance or dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def _read_csv(store, key: str) -> list[list[str]]:
    text = (
        zstandard.ZstdDecompressor()
        .stream_reader(io.BytesIO(store.read_bytes(key)))
        .read()
        .decode()
    )
    return list(csv.reader(io.StringIO(text, newline="")))


def test_months_back_up_then_skip_then_reupload_the_changed_one(
    clickhouse, ch, object_store_resource
) -> None:
    _fill_fastpath(ch, {"2024-01": 300, "2024-02": 200, "2024-04": 50})  # March is empty
    instance = dg.DagsterInstance.ephemeral()
    result = _run(
        clickhouse,
        object_store_resource,
        [fastpath_backup, fastpath_restore_check],
        instance=instance,
    )
    assert result.success
    store = object_store_resource.get_store()
    keys = [f"clickhouse_export/csv/fastpath_2024{m}.csv.zstd" for m in ("01", "02", "04")]
    assert [k for k in store.list_keys("clickhouse_export/csv/")] == keys
    rows = _read_csv(store, keys[1])
    header = ch.header("SELECT * FROM fastpath")
    assert rows[0] == header and "update_time" not in header
    assert len(rows) == 201
    assert sorted(r[header.index("measurement_uid")] for r in rows[1:])[:2] == [
        "2024-02-0",
        "2024-02-1",
    ]
    assert rows[1][header.index("input")].startswith('https://x.org/"q",')
    meta = materialization_metadata(result)
    assert (
        meta["objects_written"] == 3
        and meta["dagster/row_count"] == 550
        and meta["objects_skipped"] == 0
    )
    manifest = json.loads(store.read_bytes(MANIFEST_KEY))["objects"]
    assert manifest[keys[0]]["rows"] == 300 and manifest[keys[0]]["chunk"] == "202401"
    assert manifest[keys[0]]["bytes"] == len(store.read_bytes(keys[0]))
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.metadata["objects_checked"].value == 3

    # Unmerged duplicates of January (same rows inserted again), then merged away:
    # the fingerprint sees the deduplicated content, so nothing is re-uploaded.
    ch.command(
        "INSERT INTO fastpath SELECT * FROM fastpath WHERE toYYYYMM(measurement_start_time) = 202401"
    )
    second = _run(clickhouse, object_store_resource, [fastpath_backup], instance=instance)
    assert (
        materialization_metadata(second)["objects_written"] == 0
        and materialization_metadata(second)["objects_skipped"] == 3
    )
    ch.command("OPTIMIZE TABLE fastpath FINAL")
    third = _run(clickhouse, object_store_resource, [fastpath_backup], instance=instance)
    assert materialization_metadata(third)["objects_written"] == 0

    # A real change in February: only February goes up again.
    _fill_fastpath(ch, {"2024-02": 201})
    fourth = _run(
        clickhouse,
        object_store_resource,
        [fastpath_backup, fastpath_restore_check],
        instance=instance,
    )
    assert materialization_metadata(fourth)["written_keys"] == [keys[1]]
    assert len(_read_csv(store, keys[1])) == 202
    (check,) = fourth.get_asset_check_evaluations()
    assert check.passed and check.metadata["objects_checked"].value == 1


def test_small_table_whole_and_restore_round_trip(clickhouse, ch, local_store_resource) -> None:
    ensure_tables(ch, "asnmeta")
    ch.command(
        "INSERT INTO asnmeta SELECT number, concat('Org ', toString(number), ', \"Ltd\"'), 'IT', "
        "toDate('2020-01-01') + number, '', 'RIPE' FROM numbers(1000)"
    )
    result = _run(clickhouse, local_store_resource, [asnmeta_backup, asnmeta_restore_check])
    assert result.success
    store = local_store_resource.get_store()
    assert store.list_keys("clickhouse_export/csv/") == ["clickhouse_export/csv/asnmeta.csv.zstd"]
    (check,) = result.get_asset_check_evaluations()
    assert check.passed
    (entry,) = check.metadata["results"].value.values()
    assert entry["rows"] == 1000 and entry["match"]


def test_restore_check_detects_a_damaged_object(clickhouse, ch, local_store_resource) -> None:
    _fill_fastpath(ch, {"2024-01": 100})
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, local_store_resource, [fastpath_backup], instance=instance).success
    store = local_store_resource.get_store()
    key = "clickhouse_export/csv/fastpath_202401.csv.zstd"
    rows = _read_csv(store, key)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows[:-1])  # one row lost
    store.put_bytes(key, zstandard.ZstdCompressor().compress(out.getvalue().encode()))
    context = dg.build_asset_check_context(
        resources={"clickhouse": clickhouse, "object_store": local_store_resource},
        instance=instance,
    )
    result = fastpath_restore_check(context)
    assert not result.passed
    assert result.metadata["results"].value[key]["rows"] == 99


def test_restore_check_stops_a_bomb_at_the_recorded_size(
    clickhouse, ch, s3_store_resource, s3_client, s3_bucket, tmp_path, monkeypatch
) -> None:
    ensure_tables(ch, "asnmeta")
    ch.command(
        "INSERT INTO asnmeta SELECT number, 'Org', 'IT', toDate('2020-01-01'), '', 'RIPE' "
        "FROM numbers(1000)"
    )
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, s3_store_resource, [asnmeta_backup], instance=instance).success
    store = s3_store_resource.get_store()
    key = "clickhouse_export/csv/asnmeta.csv.zstd"
    recorded = json.loads(store.read_bytes(MANIFEST_KEY))["objects"][key]["uncompressed_bytes"]
    header, row = (
        zstandard.ZstdDecompressor()
        .stream_reader(io.BytesIO(store.read_bytes(key)))
        .read()
        .splitlines(keepends=True)[:2]
    )
    # The object replaced in the bucket by 64 MiB of valid rows in a few KB of zstd.
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=bomb("zstd", 64 << 20, header, row))
    # chdb stages a raw insert in a temporary file: watch how large it gets.
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    context = dg.build_asset_check_context(
        resources={"clickhouse": clickhouse, "object_store": s3_store_resource},
        instance=instance,
    )
    with PeakFileSize(staging) as written:
        result = asnmeta_restore_check(context)
    assert not result.passed
    entry = result.metadata["results"].value[key]
    assert entry["match"] is False and "rows" not in entry
    assert f"{key} unpacks to more than {recorded} bytes" in entry["error"]
    assert written.peak <= recorded
    assert list(staging.iterdir()) == []
    assert ch.count("asnmeta") == 1000
    assert not [t for (t,) in ch.query_rows("SHOW TABLES") if t.startswith("_restore_check")]


def test_upload_failure_mid_object_leaves_nothing(
    clickhouse, ch, moto_endpoint, s3_bucket, s3_client
) -> None:
    # About 13 MB of zstd: several 5 MiB parts; the proxy fails part 2 every time.
    _fill_fastpath(ch, {"2024-01": 400_000}, random_chars=40)
    proxy = FaultyProxy(
        moto_endpoint, lambda method, path: method == "PUT" and "partNumber=2" in path
    )
    try:
        resource = ObjectStoreResource(
            bucket=s3_bucket, endpoint_url=proxy.url, region_name="us-east-1", part_size_mb=5
        )
        result = _run(clickhouse, resource, [fastpath_backup])
    finally:
        proxy.close()
    assert not result.success
    assert "backing up fastpath 202401" in failure_text(result)
    assert proxy.failed
    assert (
        s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    )  # neither object nor manifest
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_parse_tables_and_schedule() -> None:
    assert parse_tables("fastpath:measurement_start_time, citizenlab") == (
        FASTPATH,
        BackupTable("citizenlab"),
    )
    with pytest.raises(ValueError, match="invalid ClickHouse identifier"):
        parse_tables("fastpath; DROP TABLE x")
    assert (
        backup_schedule.name == "backup_schedule" and backup_schedule.cron_schedule == "0 2 * * 6"
    )
