"""The database backup on real chdb, the moto S3 server and a local directory."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tempfile
import threading
import time

import dagster as dg
import pytest
import zstandard

from ooni_pipeline.backup.assets import (
    BackupConfig,
    RestoreCheckConfig,
    build_backup_asset,
    pause_s,
)
from ooni_pipeline.backup.definitions import backup_schedule
from ooni_pipeline.backup.manifest import load_manifest, record_objects
from ooni_pipeline.backup.plan import (
    LEGACY_MANIFEST_KEY,
    LEGACY_ROW_HASH,
    ROW_HASH_VERSION,
    BackupTable,
    fingerprint_text,
    manifest_key,
    needs_final,
    parse_tables,
    row_hash_sql,
    select_star_columns,
)
from ooni_pipeline.backup.verify import verify_object
from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.object_store import ObjectStoreResource
from ooni_pipeline_tests.conftest import SERVER_DATABASE, SERVER_PASSWORD, SERVER_USER
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
FAST = {"pause_between_chunks_s": 0.0, "chunk_attempts": 1, "snapshot_lag_s": 0.0}


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
    ops = {
        a.op.name: {"config": config}
        for a in assets
        if isinstance(a, dg.AssetsDefinition) and not isinstance(a, dg.AssetChecksDefinition)
    }
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
    manifest = load_manifest(store, "fastpath")
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
    # The object just written, and two older ones in rotation.
    assert check.passed and check.metadata["objects_checked"].value == 3
    assert check.metadata["objects_just_written"].value == 1


def test_small_table_whole_and_restore_round_trip(clickhouse, ch, s3_store_resource) -> None:
    """Names holding quotes, commas and line breaks (``\\n``, ``\\r\\n``) inside a field:
    the object's lines, as the engine reads them back, are the ones the export
    counted; parsed into the table's types, its rows are the ones fingerprinted."""
    ensure_tables(ch, "asnmeta")
    ch.command(
        "INSERT INTO asnmeta (asn, org_name, cc, changed, aut_name, source) SELECT number, concat('Org ', toString(number), ', \"Ltd\"', "
        "if(number % 3 = 0, '\\nsecond line\\r\\n', '')), 'IT', "
        "toDate('2020-01-01') + number, '', 'RIPE' FROM numbers(1000)"
    )
    result = _run(clickhouse, s3_store_resource, [asnmeta_backup, asnmeta_restore_check])
    assert result.success
    store = s3_store_resource.get_store()
    key = "clickhouse_export/csv/asnmeta.csv.zstd"
    assert store.list_keys("clickhouse_export/csv/") == [key]
    (check,) = result.get_asset_check_evaluations()
    assert check.passed
    (entry,) = check.metadata["results"].value.values()
    # the header, 1000 rows, and two more lines in each of the 334 names that break
    assert entry["lines"] == 1 + 1000 + 2 * 334 and entry["match"]
    assert entry["read_by"] == "engine (lines)"
    recorded = load_manifest(store, "asnmeta")[key]
    assert recorded["lines"] == entry["lines"]
    assert (
        entry["found"] == entry["expected"] == f"1669 lines, {recorded['uncompressed_bytes']} bytes"
    )
    typed = verify_object(ch, store, "asnmeta", key, recorded, reading="typed")
    assert typed["rows"] == 1000 and typed["match"] and typed["read_by"] == "engine (typed)"
    assert typed["fingerprint"] == recorded["fingerprint"]
    # zstd's content checksum is in the object: any reader verifies what it unpacks
    assert zstandard.get_frame_parameters(store.read_bytes(key)).has_checksum
    assert recorded["etag"] == store.etag(key)  # S3's tag, checked without a download
    restored = _read_csv(store, key)
    assert len(restored) == 1001 and restored[1 + 999][1] == 'Org 999, "Ltd"\nsecond line\r\n'


def test_an_emptied_table_never_replaces_its_backup(clickhouse, ch, local_store_resource) -> None:
    ensure_tables(ch, "asnmeta")
    ch.command(
        "INSERT INTO asnmeta (asn, org_name, cc, changed, aut_name, source) SELECT number, 'Org', 'IT', toDate('2020-01-01'), '', 'RIPE' "
        "FROM numbers(1000)"
    )
    assert _run(clickhouse, local_store_resource, [asnmeta_backup]).success
    store = local_store_resource.get_store()
    key = "clickhouse_export/csv/asnmeta.csv.zstd"
    backed_up = store.read_bytes(key)
    ch.command("TRUNCATE TABLE asnmeta")
    emptied = _run(clickhouse, local_store_resource, [asnmeta_backup])
    assert not emptied.success
    assert f"asnmeta ({key}): 0 rows would replace the 1000 published" in failure_text(emptied)
    assert store.read_bytes(key) == backed_up
    assert load_manifest(store, "asnmeta")[key]["rows"] == 1000
    forced = _run(clickhouse, local_store_resource, [asnmeta_backup], {**FAST, "force": True})
    assert forced.success and len(_read_csv(store, key)) == 1  # the header alone


def test_restore_check_detects_a_damaged_object(clickhouse, ch, s3_store_resource) -> None:
    _fill_fastpath(ch, {"2024-01": 100})
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, s3_store_resource, [fastpath_backup], instance=instance).success
    store = s3_store_resource.get_store()
    key = "clickhouse_export/csv/fastpath_202401.csv.zstd"
    text = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(store.read_bytes(key))).read()
    lines = text.splitlines(keepends=True)
    assert len(lines) == 101
    context = dg.build_asset_check_context(
        resources={"clickhouse": clickhouse, "object_store": s3_store_resource},
        instance=instance,
    )
    entry = load_manifest(store, "fastpath")[key]

    def damaged(data: bytes) -> dict:
        store.put_bytes(key, zstandard.ZstdCompressor().compress(data))
        result = fastpath_restore_check(context)
        assert not result.passed
        return result.metadata["results"].value[key]

    # one row lost: not the object written; parsed, one row fewer
    lost = damaged(b"".join(lines[:-1]))
    assert "is not the object the backup wrote" in lost["error"]
    assert verify_object(ch, store, "fastpath", key, entry, reading="typed")["rows"] == 99
    # one character changed inside a field: as many lines and bytes, not the same object
    changed = damaged(
        b"".join(lines[:50]) + lines[50].replace(b"2024-01-", b"2024-01+", 1) + b"".join(lines[51:])
    )
    assert "is not the object the backup wrote" in changed["error"]
    typed = verify_object(ch, store, "fastpath", key, entry, reading="typed")
    assert typed["rows"] == 100 and not typed["match"]
    # the bytes stored go bad after the upload (a bit flips): the engine's zstd finds it
    good = zstandard.ZstdCompressor(write_checksum=True).compress(text)
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 1
    store.put_bytes(key, bytes(flipped))
    # (as S3 would still tag it: ETags are computed when the object is uploaded)
    as_stored = {
        **entry,
        "bytes": len(flipped),
        "sha256": hashlib.sha256(flipped).hexdigest(),
        "etag": store.etag(key),
    }
    rotten = verify_object(ch, store, "fastpath", key, as_stored, reading="lines")
    assert not rotten["match"] and "checksum" in rotten["error"], rotten
    # an entry recorded before lines were (no "lines"): read as typed rows
    store.put_bytes(key, good)
    earlier = {k: v for k, v in entry.items() if k != "lines"}
    assert verify_object(ch, store, "fastpath", key, earlier, reading="lines") == {
        "rows": 100,
        "fingerprint": entry["fingerprint"],
        "expected": entry["fingerprint"],
        "match": True,
        "read_by": "engine (typed)",
    }


FASTPATH_LATE_ROW = (
    "INSERT INTO fastpath (measurement_uid, report_id, input, probe_cc, probe_asn, test_name, "
    "measurement_start_time, anomaly, confirmed, msm_failure, blocking_type, scores) "
    "VALUES (concat('late-', toString({n:UInt64})), 'late', 'https://late.example/', 'IT', 3269, "
    "'web_connectivity', toDateTime('2024-01-02 00:00:00', 'UTC'), 'f', 'f', 'f', '', '{}')"
)
ASNMETA_LATE_ROW = "INSERT INTO asnmeta (asn, org_name, cc, changed, aut_name, source) VALUES ({n:UInt64} + 1000000, 'late', 'IT', today(), '', 'RIPE')"


class _Inserter:
    """Inserts one row after another (``sql`` with the parameter ``n``) from another
    connection, as OONI's fastpath does all day, until stopped."""

    def __init__(self, url: str, sql: str):
        self.url, self.sql, self.rows = url, sql, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with ClickHouse(self.url) as ch:
            while not self._stop.is_set():
                ch.command(self.sql, {"n": self.rows})
                self.rows += 1
                time.sleep(0.002)

    def __enter__(self) -> _Inserter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_rows_inserted_during_the_backup_do_not_fail_the_restore_check(
    clickhouse, ch, local_store_resource
) -> None:
    """The object, its manifest fingerprint and the restore check describe one
    snapshot, however many rows arrive while the month is exported."""
    _fill_fastpath(ch, {"2024-01": 200_000, "2024-02": 1_000}, random_chars=20)
    time.sleep(1.0)
    with _Inserter(clickhouse.url, FASTPATH_LATE_ROW) as inserter:
        result = _run(
            clickhouse,
            local_store_resource,
            [fastpath_backup, fastpath_restore_check],
            config={**FAST, "snapshot_lag_s": 0.5},
        )
    assert inserter.rows > 20, "the inserter must have run during the backup"
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.metadata["results"].value
    store = local_store_resource.get_store()
    exported = len(_read_csv(store, "clickhouse_export/csv/fastpath_202401.csv.zstd")) - 1
    manifest = load_manifest(store, "fastpath")
    assert manifest["clickhouse_export/csv/fastpath_202401.csv.zstd"]["rows"] == exported
    assert 200_000 <= exported < 200_000 + inserter.rows


@pytest.mark.clickhouse_backends_except(
    "server-24.8", reason="its engine runs one query at a time: no insert lands mid-export"
)
def test_a_table_without_insertion_time_changing_during_export_is_retried_then_fails(
    clickhouse, ch, local_store_resource
) -> None:
    """Without a snapshot column, rows changing under the export make the attempt
    fail (fingerprints before and after differ); no manifest entry claims them."""
    ensure_tables(ch, "asnmeta")
    ch.command(
        "INSERT INTO asnmeta (asn, org_name, cc, changed, aut_name, source) SELECT number, 'Org', 'IT', toDate('2020-01-01'), '', 'RIPE' "
        "FROM numbers(300000)"
    )
    with _Inserter(clickhouse.url, ASNMETA_LATE_ROW):
        result = _run(
            clickhouse, local_store_resource, [asnmeta_backup], config={**FAST, "chunk_attempts": 2}
        )
    assert not result.success
    text = failure_text(result)
    assert "failed after 2 attempts" in text and "asnmeta changed while it was exported" in text
    assert load_manifest(local_store_resource.get_store()) == {}
    assert _run(clickhouse, local_store_resource, [asnmeta_backup]).success


def test_rows_lost_between_the_engine_and_the_object_fail_the_export(
    clickhouse, ch, object_store_resource, monkeypatch
) -> None:
    """The export counts the lines it sends against those the fingerprinted rows
    make: a block lost on the way (a fault injected after the engine) is caught
    before the upload completes, so the last good backup stays under its key, byte
    for byte, and the manifest still describes it, on every attempt."""
    _fill_fastpath(ch, {"2024-01": 150_000})
    assert _run(clickhouse, object_store_resource, [fastpath_backup]).success
    store = object_store_resource.get_store()
    key = "clickhouse_export/csv/fastpath_202401.csv.zstd"
    good, recorded = store.read_bytes(key), load_manifest(store, "fastpath")
    _fill_fastpath(ch, {"2024-01": 150_001})  # a change: the month goes up again

    stream = ClickHouse.stream

    def losing_the_second(self, *args, **kwargs):
        for number, block in enumerate(stream(self, *args, **kwargs)):
            if number != 1:
                yield block

    monkeypatch.setattr(ClickHouse, "stream", losing_the_second)
    config = {**FAST, "chunk_attempts": 2}  # the retry waits 2 s
    result = _run(clickhouse, object_store_resource, [fastpath_backup], config)
    assert not result.success
    text = failure_text(result)
    assert "failed after 2 attempts" in text
    assert "fastpath 202401 changed while it was exported, or rows were lost on the way" in text
    assert store.read_bytes(key) == good  # no attempt replaced the good backup
    assert load_manifest(store, "fastpath") == recorded
    assert hashlib.sha256(good).hexdigest() == recorded[key]["sha256"]
    assert store.list_keys("clickhouse_export/csv/") == [key]  # nothing left beside it
    monkeypatch.undo()
    assert _run(clickhouse, object_store_resource, [fastpath_backup]).success  # then redone
    assert load_manifest(store, "fastpath")[key]["rows"] == 150_001
    assert (
        hashlib.sha256(store.read_bytes(key)).hexdigest()
        == (load_manifest(store, "fastpath")[key]["sha256"])
    )


def test_restore_check_stops_a_bomb_at_the_recorded_size(
    clickhouse, ch, s3_store_resource, s3_client, s3_bucket, tmp_path, monkeypatch
) -> None:
    ensure_tables(ch, "asnmeta")
    ch.command(
        "INSERT INTO asnmeta (asn, org_name, cc, changed, aut_name, source) SELECT number, 'Org', 'IT', toDate('2020-01-01'), '', 'RIPE' "
        "FROM numbers(1000)"
    )
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, s3_store_resource, [asnmeta_backup], instance=instance).success
    store = s3_store_resource.get_store()
    key = "clickhouse_export/csv/asnmeta.csv.zstd"
    recorded = load_manifest(store, "asnmeta")[key]["uncompressed_bytes"]
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
    # just written, it is compared with the bytes uploaded before anything is unpacked
    assert recorded > 0 and f"{key} is not the object the backup wrote" in entry["error"]
    manifest_entry = load_manifest(store, "asnmeta")[key]
    typed = verify_object(ch, store, "asnmeta", key, manifest_entry, reading="typed")
    assert f"{key} unpacks to more than the 1000 rows recorded" in typed["error"]
    assert written.peak == 0
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


def test_backups_finishing_together_keep_every_manifest_entry(
    clickhouse, ch, s3_store_resource
) -> None:
    """Several tables' backups (the production pool runs 3 at once) all finish and
    record their objects at the same moment, on S3 over HTTP."""
    tables = [f"t{i}" for i in range(6)]
    specs = [build_backup_asset(BackupTable(t)) for t in tables]
    for table in tables:
        ch.command(f"CREATE TABLE {table} (n UInt64) ENGINE = MergeTree ORDER BY n")
        ch.command(f"INSERT INTO {table} SELECT number FROM numbers(1000)")
    start = threading.Barrier(len(tables))
    results: dict[str, bool] = {}

    def back_up(table: str, backup: dg.AssetsDefinition) -> None:
        with dg.DagsterInstance.ephemeral() as instance:  # disposed in its own thread
            start.wait()
            results[table] = _run(
                clickhouse, s3_store_resource, [backup], instance=instance
            ).success

    threads = [
        threading.Thread(target=back_up, args=(t, backup))
        for t, (backup, _) in zip(tables, specs, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == dict.fromkeys(tables, True)
    manifest = load_manifest(s3_store_resource.get_store())
    assert sorted(manifest) == [f"clickhouse_export/csv/{t}.csv.zstd" for t in tables]
    assert all(entry["rows"] == 1000 for entry in manifest.values())


def test_manifest_writers_at_the_same_instant_lose_nothing(s3_store_resource) -> None:
    store = s3_store_resource.get_store()
    tables = [f"t{i}" for i in range(8)]
    start = threading.Barrier(len(tables))

    def record(table: str) -> None:
        start.wait()
        record_objects(store, table, {f"clickhouse_export/csv/{table}.csv.zstd": {"table": table}})

    threads = [threading.Thread(target=record, args=(t,)) for t in tables]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(load_manifest(store)) == len(tables)
    assert store.exists(manifest_key("t3"))


def test_the_single_manifest_of_earlier_versions_is_still_read(local_store_resource) -> None:
    store = local_store_resource.get_store()
    legacy = {
        "clickhouse_export/csv/asnmeta.csv.zstd": {"table": "asnmeta", "fingerprint": "1:ab"},
        "clickhouse_export/csv/fastpath_202401.csv.zstd": {"table": "fastpath"},
    }
    store.put_bytes(LEGACY_MANIFEST_KEY, json.dumps({"version": 1, "objects": legacy}).encode())
    assert load_manifest(store, "asnmeta") == {
        "clickhouse_export/csv/asnmeta.csv.zstd": legacy["clickhouse_export/csv/asnmeta.csv.zstd"]
    }
    record_objects(
        store, "asnmeta", {"clickhouse_export/csv/asnmeta.csv.zstd": {"table": "asnmeta"}}
    )
    assert load_manifest(store) == {
        **legacy,
        "clickhouse_export/csv/asnmeta.csv.zstd": {"table": "asnmeta"},
    }


def test_replicated_and_shared_engines_are_read_with_final() -> None:
    """A cluster's ReplicatedReplacingMergeTree or ClickHouse Cloud's
    SharedReplacingMergeTree hold unmerged versions like the plain engine (chdb has
    no Keeper to create one, so the engine names are checked)."""
    for engine in ("ReplacingMergeTree", "CollapsingMergeTree", "AggregatingMergeTree"):
        assert needs_final(engine)
        assert needs_final(f"Replicated{engine}") and needs_final(f"Shared{engine}")
    for engine in ("MergeTree", "ReplicatedMergeTree", "SharedMergeTree", "EmbeddedRocksDB"):
        assert not needs_final(engine)
    assert not needs_final("ReplicatedReplacingMergeTreeX") and not needs_final("Log")


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


def _check_now(check, clickhouse, store_resource, instance) -> dg.AssetCheckResult:
    context = dg.build_asset_check_context(
        resources={"clickhouse": clickhouse, "object_store": store_resource}, instance=instance
    )
    return check(context, RestoreCheckConfig())


def test_restore_check_has_the_engine_read_each_object_without_scratch_table_or_temp_file(
    clickhouse, ch, object_store_resource, tmp_path, monkeypatch
) -> None:
    """The engine reads the object where it lies (count and checksum from the object
    itself); nothing is staged in a temporary file, no table is created. A server
    cannot see the local object store: that case takes the documented fallback."""
    _fill_fastpath(ch, {"2024-01": 150_000}, random_chars=30)
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, object_store_resource, [fastpath_backup], instance=instance).success
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    monkeypatch.setenv("TMPDIR", str(staging))
    local = object_store_resource.local_dir is not None
    with PeakFileSize(staging) as written:
        result = _check_now(fastpath_restore_check, clickhouse, object_store_resource, instance)
    assert result.passed
    (entry,) = result.metadata["results"].value.values()
    assert entry["match"]
    if local and not ch.embedded:
        assert entry["read_by"].startswith("scratch table") and entry["rows"] == 150_000
    else:
        assert entry["read_by"] == "engine (lines)" and entry["lines"] == 150_001
    assert written.peak == 0 and list(staging.iterdir()) == []


def test_restore_check_verifies_the_new_objects_and_a_rotating_sample_of_older_ones(
    clickhouse, ch, s3_store_resource
) -> None:
    _fill_fastpath(ch, {"2024-01": 10, "2024-02": 10, "2024-03": 10, "2024-04": 10})
    instance = dg.DagsterInstance.ephemeral()
    checked = []
    for _ in range(4):
        result = _run(
            clickhouse,
            s3_store_resource,
            [fastpath_backup, fastpath_restore_check],
            instance=instance,
        )
        (check,) = result.get_asset_check_evaluations()
        assert check.passed
        results = check.metadata["results"].value
        checked.append(sorted(results))
        assert "2 older object(s) per run" in check.metadata["bound"].value
        just_written = materialization_metadata(result)["written_keys"]
        assert {k: r["read_by"] for k, r in results.items()} == {
            k: "engine (lines)" if k in just_written else "engine (typed)" for k in results
        }
    months = [f"clickhouse_export/csv/fastpath_2024{m}.csv.zstd" for m in ("01", "02", "03", "04")]
    assert checked == [months, months[:2], months[2:], months[:2]]


def test_no_pause_on_the_embedded_database(clickhouse, ch, local_store_resource) -> None:
    """The default pause config: embedded, nobody else can be queuing, so none."""
    _fill_fastpath(ch, {"2024-01": 10, "2024-02": 10, "2024-03": 10})
    defaults = {"chunk_attempts": 1, "snapshot_lag_s": 0.0}
    result = _run(clickhouse, local_store_resource, [fastpath_backup], config=defaults)
    meta = materialization_metadata(result)
    assert meta["objects_written"] == 3
    if ch.embedded:
        assert meta["duration_s"] < 4.0


@pytest.mark.clickhouse_backends("server")
def test_on_a_server_the_pause_follows_the_load(clickhouse, ch) -> None:
    config = BackupConfig()
    assert pause_s(ch, config, 4.0) == 0.0  # nothing else running
    busy = threading.Thread(
        target=lambda: ClickHouse(clickhouse.url).command(
            "SELECT sleepEachRow(0.5) FROM numbers(6) FORMAT Null"
        )
    )
    busy.start()
    try:
        time.sleep(0.7)
        assert pause_s(ch, config, 4.0) == 2.0  # half the last chunk's time
        assert pause_s(ch, config, 40.0) == 5.0  # at most pause_between_chunks_s
        assert pause_s(ch, BackupConfig(pause_fraction=0), 4.0) == 0.0
    finally:
        busy.join()


def test_nothing_changed_is_decided_from_the_parts(clickhouse, ch, local_store_resource) -> None:
    """A rerun with nothing changed looks at the parts, not the rows; a merge changes
    the parts but not the content (one fingerprint, then parts again); an insert
    into one month leaves the other months to the parts."""
    _fill_fastpath(ch, {"2024-01": 100, "2024-02": 100})
    _fill_fastpath(ch, {"2024-03": 100})  # its own part, whose range is March only
    time.sleep(1.1)  # parts settled: older than the snapshot by a whole second
    instance = dg.DagsterInstance.ephemeral()

    def run() -> dict:
        result = _run(clickhouse, local_store_resource, [fastpath_backup], instance=instance)
        assert result.success
        return materialization_metadata(result)

    assert run()["objects_written"] == 3
    meta = run()
    assert meta["objects_skipped"] == 3 and meta["objects_skipped_by_parts"] == 3
    ch.command("OPTIMIZE TABLE fastpath FINAL")
    time.sleep(1.1)
    meta = run()
    assert meta["objects_skipped"] == 3 and meta["objects_skipped_by_parts"] == 0
    assert run()["objects_skipped_by_parts"] == 3
    _fill_fastpath(ch, {"2024-03": 101})
    time.sleep(1.1)
    meta = run()
    assert meta["written_keys"] == ["clickhouse_export/csv/fastpath_202403.csv.zstd"]
    assert meta["objects_skipped_by_parts"] == 2


def test_s3_credentials_never_reach_the_check_results(
    clickhouse, ch, moto_endpoint, s3_bucket, monkeypatch
) -> None:
    """The engine reads the object through a presigned URL, never the store's
    credentials; an object it fails to read yields an error naming the object,
    never the keys or the URL's signature."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAKEYIDNEVERSHOWN")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-in-errors-91c2")
    resource = ObjectStoreResource(
        bucket=s3_bucket, endpoint_url=moto_endpoint, region_name="us-east-1", part_size_mb=5
    )
    ensure_tables(ch, "asnmeta")
    ch.command(
        "INSERT INTO asnmeta (asn, org_name, cc, changed, aut_name, source) SELECT number, 'Org', 'IT', toDate('2020-01-01'), '', 'RIPE' "
        "FROM numbers(100)"
    )
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, resource, [asnmeta_backup], instance=instance).success
    store = resource.get_store()
    key = "clickhouse_export/csv/asnmeta.csv.zstd"
    store.put_bytes(key, b"\x28\xb5\x2f\xfd not zstd after all")
    result = _check_now(asnmeta_restore_check, clickhouse, resource, instance)
    assert not result.passed
    entry = result.metadata["results"].value[key]
    assert entry["match"] is False and entry["error"]
    text = json.dumps({k: str(v.value) for k, v in result.metadata.items()})
    assert "asnmeta.csv.zstd" in text
    for secret in ("AKIAKEYIDNEVERSHOWN", "secret-never-in-errors-91c2", "X-Amz-Signature"):
        assert secret not in text


def test_parts_holding_rows_newer_than_the_snapshot_are_never_taken_for_unchanged(
    clickhouse, ch, local_store_resource
) -> None:
    """Rows inserted within the snapshot lag are left for the next backup; the parts
    holding them must not mark the month unchanged, or those rows would never be
    backed up. Fresh parts without such rows are recorded at once."""
    ensure_tables(ch, "fastpath")
    ch.command(  # two months inserted two hours ago
        "INSERT INTO fastpath (measurement_uid, report_id, input, probe_cc, probe_asn, test_name, "
        "measurement_start_time, anomaly, confirmed, msm_failure, blocking_type, scores, update_time) "
        "SELECT toString(number), 'r', 'https://x.org/', 'IT', 3269, 'web_connectivity', "
        "toDateTime('2024-01-01 00:00:00', 'UTC') + toIntervalDay(number % 2 * 31) + number, "
        "'f', 'f', 'f', '', '{}', now64(3) - toIntervalHour(2) FROM numbers(200) "
        "SETTINGS insert_allow_materialized_columns = 1"
    )
    ch.command(FASTPATH_LATE_ROW, {"n": 1})  # January, inserted now: after the snapshot
    instance = dg.DagsterInstance.ephemeral()
    lagged = {**FAST, "snapshot_lag_s": 600.0}

    def run(config: dict) -> dict:
        result = _run(clickhouse, local_store_resource, [fastpath_backup], config, instance)
        assert result.success
        return materialization_metadata(result)

    assert run(lagged)["dagster/row_count"] == 200
    manifest = load_manifest(local_store_resource.get_store(), "fastpath")
    january, february = (f"clickhouse_export/csv/fastpath_2024{m}.csv.zstd" for m in ("01", "02"))
    assert "parts" not in manifest[january] and "parts" in manifest[february]
    meta = run(lagged)
    assert meta["objects_skipped"] == 2 and meta["objects_skipped_by_parts"] == 1
    meta = run(FAST)  # no lag: the late row is in, January goes up again
    assert meta["written_keys"] == [january] and meta["dagster/row_count"] == 101


@pytest.mark.clickhouse_backends("server")
def test_an_old_servers_stream_failing_midway_never_replaces_a_backup(
    clickhouse, clickhouse_server, ch, s3_store_resource
) -> None:
    """A server before 25.11 ends a failing result with status 200 and its message
    as data: the export's line count (against the fingerprint) fails the attempt
    before its upload completes, and the last good backup stays."""
    _fill_fastpath(ch, {"2024-01": 100_000})
    assert _run(clickhouse, s3_store_resource, [fastpath_backup]).success
    store = s3_store_resource.get_store()
    key = "clickhouse_export/csv/fastpath_202401.csv.zstd"
    good, recorded = store.read_bytes(key), load_manifest(store, "fastpath")
    _fill_fastpath(ch, {"2024-01": 100_001})
    with (
        clickhouse_server.old_server(),
        clickhouse_server.failing_results("SETTINGS max_threads = 2", 2 << 20),
    ):
        result = _run(clickhouse, s3_store_resource, [fastpath_backup])
    assert not result.success
    assert "the server's answer ended with an error text" in failure_text(result)
    assert store.read_bytes(key) == good and load_manifest(store, "fastpath") == recorded


def test_a_change_in_a_row_holding_a_null_is_backed_up(
    clickhouse, ch, object_store_resource, operator_tables
) -> None:
    """OONI's fastpath has ``ooni_run_link_id Nullable(UInt64)``, NULL in most rows: a
    change to such a row must change the month's fingerprint (a hash of a row with a
    NULL is NULL, and a sum skips it)."""
    _fill_fastpath(ch, {"2024-01": 100})
    assert ch.scalar("SELECT countIf(ooni_run_link_id IS NULL) FROM fastpath") == 100
    instance = dg.DagsterInstance.ephemeral()
    first = _run(clickhouse, object_store_resource, [fastpath_backup], instance=instance)
    assert first.success and materialization_metadata(first)["objects_written"] == 1
    key = "clickhouse_export/csv/fastpath_202401.csv.zstd"
    recorded = load_manifest(object_store_resource.get_store(), "fastpath")[key]["fingerprint"]
    assert recorded.startswith("100:")
    ch.command(
        "ALTER TABLE fastpath UPDATE probe_cc = 'DE' "
        "WHERE measurement_uid = '2024-01-7' SETTINGS mutations_sync = 2"
    )
    second = _run(clickhouse, object_store_resource, [fastpath_backup], instance=instance)
    assert second.success and materialization_metadata(second)["objects_written"] == 1
    rows = _read_csv(object_store_resource.get_store(), key)
    assert ["DE"] == [r[rows[0].index("probe_cc")] for r in rows[1:] if r[0] == "2024-01-7"]


def test_a_row_hash_tells_null_from_zero_on_every_server_and_keeps_the_hash_of_rows_without_nulls(
    ch,
) -> None:
    """Every row counts in a fingerprint, a NULL (at the top, in a LowCardinality, in an
    array) hashing unlike 0 or an empty string, also on ClickHouse 24.8, which throws
    on ``cityHash64`` of a NULL inside a tuple. A row without NULLs, in a table without
    nested nullables, keeps its ``cityHash64(*)``: fingerprints recorded before still
    match."""
    ch.command(
        "CREATE TABLE hashed (n Nullable(UInt64), lc LowCardinality(Nullable(String)), "
        "a Array(Nullable(UInt8))) ENGINE = MergeTree ORDER BY tuple()"
    )
    ch.command(
        "INSERT INTO hashed VALUES (NULL, NULL, [NULL]), (0, '', [0]), (NULL, '', [0]), "
        "(0, NULL, [0]), (0, '', [NULL]), (5, 'x', [1])"
    )
    row_hash = row_hash_sql(select_star_columns(ch, "hashed"))
    hashes = [h for (h,) in ch.query_rows(f"SELECT {row_hash} FROM hashed")]
    assert None not in hashes and len(set(hashes)) == 6
    rows, checksum = ch.query_rows(f"SELECT count(), sum({row_hash}) FROM hashed")[0]
    assert (rows, checksum) == (6, sum(hashes) % 2**64)

    ch.command(
        "CREATE TABLE flat (n Nullable(UInt64), lc LowCardinality(Nullable(String)), s String) "
        "ENGINE = MergeTree ORDER BY tuple()"
    )
    ch.command("INSERT INTO flat VALUES (5, 'x', 'y'), (NULL, 'x', 'y'), (5, NULL, 'y')")
    row_hash = row_hash_sql(select_star_columns(ch, "flat"))
    assert ch.scalar(f"SELECT {row_hash} FROM flat WHERE n = 5 AND lc = 'x'") == ch.scalar(
        "SELECT cityHash64(*) FROM flat WHERE n = 5 AND lc = 'x'"
    )
    assert len({h for (h,) in ch.query_rows(f"SELECT {row_hash} FROM flat")} - {None}) == 3


def test_the_row_hash_of_a_null_never_reads_what_the_engine_keeps_under_it(ch) -> None:
    """``ALTER UPDATE … = NULL`` leaves the old value under the NULL; a CSV read back
    has none: the two rows must hash alike (a review's finding)."""
    ch.command("CREATE TABLE hidden (id UInt8, n Nullable(UInt64)) ENGINE = MergeTree ORDER BY id")
    ch.command("INSERT INTO hidden VALUES (1, 5)")
    ch.command("ALTER TABLE hidden UPDATE n = NULL WHERE id = 1 SETTINGS mutations_sync = 2")
    ch.command("CREATE TABLE fresh (id UInt8, n Nullable(UInt64)) ENGINE = MergeTree ORDER BY id")
    ch.command("INSERT INTO fresh VALUES (1, NULL)")
    row_hash = row_hash_sql(select_star_columns(ch, "hidden"))
    assert ch.scalar(f"SELECT {row_hash} FROM hidden") == ch.scalar(f"SELECT {row_hash} FROM fresh")


def test_a_fastpath_value_set_to_null_backs_up_and_verifies(
    clickhouse, ch, local_store_resource, operator_tables
) -> None:
    """An operator nulls a value of OONI's fastpath (the old value stays under the
    NULL): the backup's object still reads back to the fingerprint recorded."""
    _fill_fastpath(ch, {"2024-01": 100})
    ch.command(
        "ALTER TABLE fastpath UPDATE ooni_run_link_id = 42 WHERE 1 SETTINGS mutations_sync = 2"
    )
    ch.command(
        "ALTER TABLE fastpath UPDATE ooni_run_link_id = NULL "
        "WHERE measurement_uid = '2024-01-7' SETTINGS mutations_sync = 2"
    )
    assert _run(clickhouse, local_store_resource, [fastpath_backup]).success
    store = local_store_resource.get_store()
    key = "clickhouse_export/csv/fastpath_202401.csv.zstd"
    entry = load_manifest(store, "fastpath")[key]
    assert verify_object(ch, store, "fastpath", key, entry, reading="typed")["match"]


@pytest.mark.clickhouse_backends_except(
    "server-24.8", reason="ClickHouse 24.8 has no Dynamic type without an experimental setting"
)
def test_a_change_in_a_row_holding_a_null_dynamic_changes_the_fingerprint(ch) -> None:
    """A ``Dynamic`` holding NULL hashed as is is NULL: the row would drop out of the
    sum and its changes go unseen (a review's finding)."""
    ch.command("CREATE TABLE dyn (id UInt8, v Dynamic, n UInt8) ENGINE = MergeTree ORDER BY id")
    ch.command("INSERT INTO dyn SELECT 1, NULL::Nullable(String), 1")
    row_hash = row_hash_sql(select_star_columns(ch, "dyn"))
    before = ch.query_rows(f"SELECT count(), sum({row_hash}) FROM dyn")[0]
    assert None not in before
    ch.command("ALTER TABLE dyn UPDATE n = 2 WHERE id = 1 SETTINGS mutations_sync = 2")
    assert ch.query_rows(f"SELECT count(), sum({row_hash}) FROM dyn")[0] != before


@pytest.mark.clickhouse_backends_except(
    "server-24.8", reason="the old row hash throws there on a NULL: no manifest made with it"
)
def test_an_entry_of_the_old_row_hash_is_checked_with_it_then_fingerprinted_again_once(
    clickhouse, ch, local_store_resource, operator_tables
) -> None:
    """A manifest written before the row hash had a version (fingerprints of
    ``cityHash64(tuple(*))`` for rows holding a NULL): its objects still pass the
    restore check, the next backup fingerprints its months again rather than keeping
    them by their parts, exports the month whose fingerprint moved, keeps the other,
    and from then on skips both by their parts."""
    _fill_fastpath(ch, {"2024-01": 100, "2024-02": 100})
    ch.command(
        "ALTER TABLE fastpath UPDATE ooni_run_link_id = 7 WHERE measurement_start_time "
        ">= '2024-02-01' SETTINGS mutations_sync = 2"
    )  # February: no NULL
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, local_store_resource, [fastpath_backup], instance=instance).success
    store = local_store_resource.get_store()
    legacy = {}
    for key, entry in load_manifest(store, "fastpath").items():
        month = key.rsplit("_", 1)[1][:6]
        rows, checksum = ch.query_rows(
            f"SELECT count(), sum({LEGACY_ROW_HASH}) FROM fastpath FINAL "
            "WHERE toYYYYMM(measurement_start_time, 'UTC') = {m:UInt32}",
            {"m": int(month)},
        )[0]
        legacy[key] = {k: v for k, v in entry.items() if k != "row_hash"} | {
            "fingerprint": fingerprint_text(rows, checksum)
        }
    record_objects(store, "fastpath", legacy)
    january, february = sorted(legacy)
    for key, entry in legacy.items():
        assert verify_object(ch, store, "fastpath", key, entry, reading="typed")["match"], key

    again = _run(clickhouse, local_store_resource, [fastpath_backup, fastpath_restore_check])
    assert again.success
    meta = materialization_metadata(again)
    assert (meta["objects_written"], meta["objects_fingerprinted"]) == (1, 2)
    (check,) = again.get_asset_check_evaluations()
    assert check.passed
    manifest = load_manifest(store, "fastpath")
    assert manifest[january]["fingerprint"] != legacy[january]["fingerprint"]
    assert manifest[february]["fingerprint"] == legacy[february]["fingerprint"]
    assert {e["row_hash"] for e in manifest.values()} == {ROW_HASH_VERSION}

    third = _run(clickhouse, local_store_resource, [fastpath_backup])
    assert materialization_metadata(third)["objects_skipped_by_parts"] == 2


agg_backup = build_backup_asset(BackupTable("agg"))[0]


def test_a_change_in_a_row_holding_a_null_of_a_simple_aggregate_is_backed_up(
    clickhouse, ch, local_store_resource
) -> None:
    """``SimpleAggregateFunction(f, Nullable(T))``, an AggregatingMergeTree's usual
    column, holding NULL: its row must count in the fingerprint, so a change to the
    row is exported (a review's finding: it was hashed NULL, and skipped)."""
    ch.command(
        "CREATE TABLE agg (id UInt8, x SimpleAggregateFunction(anyLast, Nullable(UInt64)), "
        "s SimpleAggregateFunction(anyLast, String)) ENGINE = AggregatingMergeTree ORDER BY id"
    )
    ch.command("INSERT INTO agg VALUES (1, NULL, 'before'), (2, 5, 'b')")
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, local_store_resource, [agg_backup], instance=instance).success
    ch.command("INSERT INTO agg VALUES (1, NULL, 'after')")  # aggregated by FINAL
    second = _run(clickhouse, local_store_resource, [agg_backup], instance=instance)
    assert materialization_metadata(second)["objects_written"] == 1
    assert ["1", "\\N", "after"] in _read_csv(
        local_store_resource.get_store(), "clickhouse_export/csv/agg.csv.zstd"
    )


var_backup = build_backup_asset(BackupTable("var"))[0]


@pytest.mark.clickhouse_backends_except(
    "server-24.8", reason="ClickHouse 24.8 has no Variant type without an experimental setting"
)
def test_a_table_with_a_column_csv_cannot_give_back_is_refused(
    clickhouse, ch, local_store_resource
) -> None:
    """A Variant's '1' and 1 are read back from CSV alike, a Tuple is written
    unquoted: such a table is refused, saying which columns, and nothing is written
    (a review's finding: it was backed up and its check failed later)."""
    ch.command(
        "CREATE TABLE var (id UInt8, v Variant(String, UInt64), t Tuple(UInt8, String)) "
        "ENGINE = MergeTree ORDER BY id"
    )
    ch.command("INSERT INTO var SELECT 1, '1'::String, (1, 'a')")
    result = _run(clickhouse, local_store_resource, [var_backup])
    assert not result.success
    assert "column(s) v, t of a type CSV cannot give back" in failure_text(result)
    assert local_store_resource.get_store().list_keys("clickhouse_export/csv/") == []


@pytest.mark.clickhouse_backends("embedded")
def test_row_hashes_are_the_same_on_clickhouse_24_8_and_on_the_embedded_engine(
    ch, clickhouse_server_24
) -> None:
    """The fingerprints recorded while OONI runs 24.8 must still match once its
    servers are upgraded (else every month would be exported again): the row hash of
    each kind of column, NULLs included, is computed on both engines and compared."""
    columns = [
        ("id", "UInt8"), ("n", "Nullable(UInt64)"), ("lc", "LowCardinality(Nullable(String))"),
        ("a", "Array(Nullable(UInt8))"), ("m", "Map(String, Nullable(String))"),
        ("x", "SimpleAggregateFunction(anyLast, Nullable(Float64))"),
        ("d", "Nullable(DateTime64(3, 'UTC'))"), ("s", "String"),
    ]  # fmt: skip
    rows = (
        "(1, NULL, NULL, [NULL], {'k': NULL}, NULL, NULL, ''), "
        "(2, 0, '', [0], {'k': ''}, 0, '1970-01-01 00:00:00', ''), "
        "(3, 7, 'x', [], {}, 1.5, '2024-01-02 03:04:05.678', 'a\\nb')"
    )
    row_hash = row_hash_sql(columns)
    hashes = []
    with ClickHouse(clickhouse_server_24.url(SERVER_USER, SERVER_PASSWORD, SERVER_DATABASE)) as old:
        for engine in (ch, old):
            engine.command("DROP TABLE IF EXISTS hashed_on_both")
            engine.command(
                f"CREATE TABLE hashed_on_both ({', '.join(f'{n} {t}' for n, t in columns)}) "
                "ENGINE = MergeTree ORDER BY id"
            )
            engine.command(f"INSERT INTO hashed_on_both VALUES {rows}")
            hashes.append(
                engine.query_rows(f"SELECT id, {row_hash} FROM hashed_on_both ORDER BY id")
            )
            engine.command("DROP TABLE hashed_on_both")
    assert clickhouse_server_24.version.startswith("24.8.")
    assert hashes[0] == hashes[1] and len({h for _, h in hashes[0]}) == 3, hashes
