"""fastpath from OONI's open bucket: real measurements in OONI's layout on moto, scored by
ClickHouse (chdb), exported, and re-exported exactly when a day's data changed.

Test data: ``data/ooni/msm_*.json`` are public OONI measurements shipped as test data
by ooni/backend (fastpath/fastpath/tests/data) and ooni/probe-cli (minipipeline
testdata); ``fingerprints_*.csv`` are ooni/blocking-fingerprints at 171641e6. The
expected scores below are what OONI's fastpath ``core.py`` (040e6ccd) computes for
them with those fingerprints.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import tarfile
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from ooni_pipeline.clickhouse.schema import DNS_SCOPES, HTTP_SCOPES, ensure_tables
from ooni_pipeline.exports.website_metrics import object_key, website_metrics
from ooni_pipeline.fastpath.assets import build_fastpath_asset, public_fastpath
from ooni_pipeline.fingerprints.parse import parse_fingerprints
from ooni_pipeline_tests.rig import bomb, failure_text

# Building fastpath from the public bucket scores with base64 functions that OONI's
# ClickHouse 24.8 servers have but the embedded 24.8 behind the server-24.8 back end
# (chdb 3.3.0) was built without; OONI's own deployment observes fastpath instead.
pytestmark = pytest.mark.clickhouse_backends_except(
    "server-24.8", reason="chdb 3.3.0 has no base64Decode/tryBase64Decode"
)

DATA = Path(__file__).parent / "data" / "ooni"
UPLOAD_DAY = "2024-01-02"

# msm file -> (anomaly, confirmed, msm_failure, blocking_type, scores) from OONI's fastpath
EXPECTED = {
    1: ("t", "t", "f", "", {"blocking_general": 1.0, "blocking_global": 0.0, "blocking_country": 1.0, "blocking_isp": 0.0, "blocking_local": 0.0, "fingerprints": [{"name": "ooni.id_lamanlabuh_kominfo", "scope": "nat", "location_found": "header.location", "confidence_no_fp": 5, "expected_countries": ["ID"]}], "confirmed": True}),
    2: ("t", "t", "f", "dns", {"blocking_general": 2.0, "blocking_global": 0.0, "blocking_country": 1.0, "blocking_isp": 0.0, "blocking_local": 0.0, "fingerprints": [{"name": "ooni.ir_10dot10_ipv4_1", "scope": "nat", "location_found": "dns", "confidence_no_fp": 10, "expected_countries": ["IR"]}], "confirmed": True, "analysis": {"blocking_type": "dns"}}),
    3: ("f", "f", "t", "", {"blocking_general": 0.0, "blocking_global": 0.0, "blocking_country": 0.0, "blocking_isp": 0.0, "blocking_local": 0.0, "accuracy": 0.0}),
    4: ("f", "f", "t", "", {"blocking_general": 0.0, "blocking_global": 0.0, "blocking_country": 0.0, "blocking_isp": 0.0, "blocking_local": 0.0, "accuracy": 0.0}),
    5: ("t", "f", "f", "http-failure", {"blocking_general": 1.0, "blocking_global": 0.0, "blocking_country": 0.0, "blocking_isp": 0.0, "blocking_local": 0.0, "analysis": {"blocking_type": "http-failure"}}),
    6: ("f", "f", "t", "", {"blocking_general": 0.0, "blocking_global": 0.0, "blocking_country": 0.0, "blocking_isp": 0.0, "blocking_local": 0.0, "accuracy": 0.0}),
    7: ("f", "f", "f", "", {"blocking_general": 0.0, "blocking_global": 0.0, "blocking_country": 0.0, "blocking_isp": 0.0, "blocking_local": 0.0}),
    8: ("t", "f", "f", "http-diff", {"blocking_general": 1.0, "blocking_global": 0.0, "blocking_country": 0.0, "blocking_isp": 0.0, "blocking_local": 0.0, "fingerprints": [{"name": "cp.f_gen_access_denied", "scope": "vbw", "location_found": "body", "confidence_no_fp": 5, "expected_countries": []}, {"name": "ooni.in_11", "scope": "inst", "location_found": "body", "confidence_no_fp": 10, "expected_countries": ["IN"]}], "analysis": {"blocking_type": "http-diff"}}),
    9: ("t", "t", "f", "dns", {"blocking_general": 2.0, "blocking_global": 0.0, "blocking_country": 1.0, "blocking_isp": 0.0, "blocking_local": 0.0, "fingerprints": [{"name": "ooni.ir_5", "scope": "nat", "location_found": "dns", "confidence_no_fp": 5, "expected_countries": ["IR"]}], "confirmed": True, "analysis": {"blocking_type": "dns"}}),
    10: ("t", "f", "f", "tcp_ip", {"blocking_general": 1.0, "blocking_global": 0.0, "blocking_country": 0.0, "blocking_isp": 0.0, "blocking_local": 0.0, "analysis": {"blocking_type": "tcp_ip"}}),
}  # fmt: skip


def real(n: int) -> dict:
    return json.loads((DATA / f"msm_{n}.json").read_text())


def member(msm: dict | bytes, received: datetime | None = None) -> tuple[str, bytes]:
    """A postcan member in OONI's form: ``<dir>/<uid>.post`` holding the wrapped measurement,
    uid ``YYYYMMDDHHMMSS.ffffff_CC_webconnectivity_<sha512(member bytes)[:16]>``."""
    if isinstance(msm, dict):
        data = json.dumps({"format": "json", "content": msm}).encode()
        cc = msm.get("probe_cc") or "ZZ"
        start = msm.get("measurement_start_time") or "2024-01-02 00:00:00"
        received = received or datetime.fromisoformat(start) + timedelta(minutes=5)
    else:
        data, cc, received = msm, "IT", received or datetime(2024, 1, 2)
    uid = f"{received:%Y%m%d%H%M%S.%f}_{cc}_webconnectivity_{hashlib.sha512(data).hexdigest()[:16]}"
    return f"{received:%Y%m%d%H}_{cc}_webconnectivity/{uid}.post", data


def postcan(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def uid_of(name: str) -> str:
    return name.rsplit("/", 1)[1][:-5]


class Bucket:
    """A moto bucket laid out as OONI's ``raw/`` prefix, readable anonymously."""

    def __init__(self, client, name: str):
        self.client, self.name = client, name
        client.create_bucket(Bucket=name, ACL="public-read")
        self.counter = 0

    def put(self, day: str, cc: str, members: list[tuple[str, bytes]], hour: str = "10") -> str:
        self.counter += 1
        compact = day.replace("-", "")
        key = (
            f"raw/{compact}/{hour}/{cc}/webconnectivity/"
            f"{compact}{hour}_{cc}_webconnectivity.n1.{self.counter}.tar.gz"
        )
        self.put_raw(key, postcan(members))
        return key

    def put_raw(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=body, ACL="public-read")


@pytest.fixture
def bucket(s3_client, moto_endpoint, monkeypatch) -> Bucket:
    # A fresh bucket per test (an object's id() is reused: a name made from it met an
    # earlier test's bucket, and its postcans, now and then).
    name = f"ooni-public-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("OONI_PUBLIC_BUCKET", name)
    monkeypatch.setenv("OONI_PUBLIC_ENDPOINT_URL", moto_endpoint)
    monkeypatch.delenv("OONI_PUBLIC_COUNTRIES", raising=False)
    return Bucket(s3_client, name)


@pytest.fixture
def fingerprints(ch) -> None:
    ensure_tables(ch, "fingerprints_dns", "fingerprints_http", "fastpath")
    for table, scopes in (("fingerprints_dns", DNS_SCOPES), ("fingerprints_http", HTTP_SCOPES)):
        body = (DATA / f"{table}.csv").read_bytes()
        ch.insert_arrow(table, parse_fingerprints(body, table, scopes).table)


fastpath_asset = build_fastpath_asset("public")


def ingest(clickhouse, day: str, instance=None, config: dict | None = None):
    return dg.materialize(
        [public_fastpath, fastpath_asset],
        selection=[public_fastpath],
        resources={"clickhouse": clickhouse},
        partition_key=day,
        instance=instance or dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"public_fastpath": {"config": config}}} if config else None,
        raise_on_error=False,
    )


def rows(ch, where: str = "1") -> pd.DataFrame:
    return ch.query_df(
        "SELECT measurement_uid, report_id, input, domain, probe_cc, probe_asn, anomaly, confirmed, "
        "msm_failure, blocking_type, scores, platform, test_version, engine_name, "
        f"toString(measurement_start_time) AS start FROM fastpath FINAL WHERE {where} ORDER BY measurement_uid"
    )


def test_real_measurements_score_as_oonis_fastpath(clickhouse, ch, fingerprints, bucket) -> None:
    members = {n: member(real(n)) for n in EXPECTED}
    bucket.put(UPLOAD_DAY, "IT", list(members.values()))
    result = ingest(clickhouse, UPLOAD_DAY)
    assert result.success, failure_text(result)
    got = rows(ch).set_index("measurement_uid")
    assert len(got) == len(EXPECTED)
    for n, (anomaly, confirmed, failure, blocking_type, scores) in EXPECTED.items():
        row = got.loc[uid_of(members[n][0])]
        assert (row.anomaly, row.confirmed, row.msm_failure, row.blocking_type) == (
            anomaly,
            confirmed,
            failure,
            blocking_type,
        ), n
        assert json.loads(row.scores) == scores, n
        # the text too, as OONI's ujson writes it (key order, 1.0 rather than 1)
        assert row.scores == json.dumps(scores, separators=(",", ":")), n
    ir = got.loc[uid_of(members[2][0])]
    assert (ir.probe_asn, ir.domain, ir.probe_cc, ir.platform) == (
        197207,
        "www.facebook.com",
        "IR",
        "android",
    )
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["scored"].value == 10 and metadata["dagster/row_count"].value == 10


def _variant(base: dict, uid_hint: str, **changes) -> dict:
    msm = copy.deepcopy(base)
    msm["report_id"] = f"20240101T000000Z_webconnectivity_IT_30722_n1_{uid_hint}"
    msm["input"] = f"https://{uid_hint}.example.org:8443/path?q=1"
    msm["measurement_start_time"] = "2024-01-01 10:00:00"
    msm["test_start_time"] = "2024-01-01 09:59:00"
    for path, value in changes.items():
        target = msm
        *parents, last = path.split("__")
        for name in parents:
            target = target[name]
        if value is KeyError:
            target.pop(last, None)
        else:
            target[last] = value
    return msm


def test_every_rule_and_the_export_of_the_day(
    clickhouse, ch, fingerprints, bucket, local_store_resource
) -> None:
    base = real(7)  # web_connectivity 0.5.26, accessible
    old = real(2)  # 0.4.1, dns blocking confirmed
    cases = {
        "ok": (_variant(base, "ok"), "f", "f", "f", "accessible"),
        "ok04": (_variant(old, "ok04"), "t", "t", "f", "dns"),
        "title": (_variant(base, "title", test_keys__title_match="yes"), "f", "f", "t", "failure"),
        "weird": (_variant(base, "weird", test_keys__blocking="weird"), "f", "f", "t", "failure"),
        "nullblock": (_variant(base, "nullblock", test_keys__blocking=None), "f", "f", "t", "failure"),
        "tcp": (_variant(base, "tcp", test_keys__blocking="tcp_ip", test_keys__accessible=False), "t", "f", "f", "tcp_ip"),
        "diff": (_variant(base, "diff", test_keys__blocking="http-diff", test_keys__accessible=False), "t", "f", "f", "http-diff"),
        "unknown": (_variant(base, "unknown", test_keys__http_experiment_failure="unknown_failure: x"), "f", "f", "t", "failure"),
        "access": (_variant(base, "access", test_keys__accessible=None), "f", "f", "t", "failure"),
        "nokeys": (_variant(base, "nokeys", test_keys=None), "f", "f", "t", "failure"),
    }  # fmt: skip
    members = {name: member(msm) for name, (msm, *_rest) in cases.items()}
    # the uid's time: received 400 days after the start, or 2 hours before it
    late = _variant(base, "tooold")
    members["tooold"] = member(late, datetime(2025, 2, 5))
    future = _variant(base, "future")
    members["future"] = member(future, datetime(2024, 1, 1, 8))
    skipped = [
        member(_variant(base, "norid", report_id=KeyError)),
        member(_variant(base, "zz", probe_cc="ZZ")),
        member(_variant(base, "as0", probe_asn="AS0")),
    ]
    yaml_member = member(b'{"format": "yaml", "content": "---\\nreport_id: x\\n"}')
    bucket.put(UPLOAD_DAY, "IT", [*members.values(), *skipped, yaml_member])
    bucket.put(UPLOAD_DAY, "DE", [member(_variant(base, "de", probe_cc="DE"))], hour="11")

    result = ingest(clickhouse, UPLOAD_DAY, config={"max_malformed_share": 0.0})
    assert result.success, failure_text(result)
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["skipped"].value == {
        "no_report_id": 1,
        "probe_cc_zz": 1,
        "probe_asn_as0": 1,
        "yaml": 1,
    }
    assert any(e.endswith(".post: yaml") and ":2024" in e for e in metadata["skip_examples"].value)
    got = rows(ch).set_index("measurement_uid")
    assert len(got) == len(cases) + 3  # + tooold, future, de
    for name, (_msm, anomaly, confirmed, failure, _category) in cases.items():
        row = got.loc[uid_of(members[name][0])]
        assert (row.anomaly, row.confirmed, row.msm_failure) == (anomaly, confirmed, failure), name
    for name, msg in (("tooold", "too old"), ("future", "from the future")):
        row = got.loc[uid_of(members[name][0])]
        assert row.msm_failure == "t" and msg in json.loads(row.scores)["msg"], name
    ok = got.loc[uid_of(members["ok"][0])]
    assert (ok.domain, ok.probe_asn, ok.start) == (
        "ok.example.org:8443",
        30722,
        "2024-01-01 10:00:00",
    )
    assert got.loc[uid_of(members["ok04"][0])].test_version == "0.4.1"

    exported = dg.materialize(
        [website_metrics],
        resources={"clickhouse": clickhouse, "object_store": local_store_resource},
        partition_key="2024-01-01",
        raise_on_error=False,
    )
    assert exported.success, failure_text(exported)
    data = local_store_resource.get_store().read_bytes(object_key("2024-01-01"))
    df = pd.read_csv(io.BytesIO(gzip.decompress(data)), keep_default_na=False)
    df["uid"] = df["explorer_url"].str.rsplit("/", n=1).str[1]
    categories = ["accessible", "dns", "tcp_ip", "http-diff", "http-failure", "anomaly", "failure"]
    by_uid = df.set_index("uid")
    for name, (_msm, _a, confirmed, _f, category) in cases.items():
        row = by_uid.loc[uid_of(members[name][0])]
        assert [c for c in categories if row[c] == 1] == [category], name
        assert row["confirmed"] == (confirmed == "t"), name
    assert len(df) == len(cases) + 3  # tooold, future and de were measured that day too
    assert set(df["probe_cc"]) == {"IT", "IR", "DE"}  # ok04 is an Iranian measurement


def test_countries_narrow_the_ingestion(clickhouse, ch, fingerprints, bucket, monkeypatch) -> None:
    base = real(7)
    bucket.put(UPLOAD_DAY, "IT", [member(_variant(base, "it"))])
    bucket.put(UPLOAD_DAY, "DE", [member(_variant(base, "de", probe_cc="DE"))])
    monkeypatch.setenv("OONI_PUBLIC_COUNTRIES", "de")
    assert ingest(clickhouse, UPLOAD_DAY).success
    assert list(rows(ch)["probe_cc"]) == ["DE"]


@pytest.mark.parametrize("damage", ["truncated", "not gzip", "gzip of garbage"])
def test_a_damaged_postcan_fails_the_day_naming_it(
    clickhouse, ch, fingerprints, bucket, damage
) -> None:
    base = real(7)
    bucket.put(UPLOAD_DAY, "IT", [member(_variant(base, f"good{n}")) for n in range(3)])
    good = postcan([member(_variant(base, "other"))])
    body = {
        "truncated": good[: len(good) // 2],
        "not gzip": b"this is not a tar.gz at all",
        "gzip of garbage": gzip.compress(b"\x00garbage" * 1000),
    }[damage]
    bad_key = "raw/20240102/12/IT/webconnectivity/2024010212_IT_webconnectivity.n1.9.tar.gz"
    bucket.put_raw(bad_key, body)
    result = ingest(clickhouse, UPLOAD_DAY)
    assert not result.success
    assert bad_key.rsplit("/", 1)[1] in failure_text(result)
    assert ch.count("fastpath") == 0  # nothing of the day half-written
    assert not [t for (t,) in ch.query_rows("SHOW TABLES") if t.startswith("fastpath_ingest")]


def test_a_postcan_bomb_stops_at_the_cap_and_writes_nothing(
    clickhouse, ch, fingerprints, bucket
) -> None:
    base = real(7)
    bucket.put(UPLOAD_DAY, "IT", [member(_variant(base, f"good{n}")) for n in range(3)])
    # A real member, then one that is not a measurement: 64 MiB of zeros, about 300 KB
    # of gzip. Skipped members count towards the cap too.
    name, data = member(_variant(base, "inside"))
    info = tarfile.TarInfo(name)
    info.size = len(data)
    padding = tarfile.TarInfo("2024010212_IT_webconnectivity/padding.bin")
    padding.size = 64 << 20
    head = info.tobuf() + data + b"\0" * (-len(data) % 512) + padding.tobuf()
    bad_key = "raw/20240102/12/IT/webconnectivity/2024010212_IT_webconnectivity.n1.9.tar.gz"
    bucket.put_raw(bad_key, bomb("gzip", len(head) + (64 << 20) + 1024, head))
    cap = 4 << 20
    result = ingest(clickhouse, UPLOAD_DAY, config={"max_postcan_unpacked_bytes": cap})
    assert not result.success
    text = failure_text(result)
    assert f"postcan {bad_key} unpacks to more than {cap} bytes" in text
    assert "max_postcan_unpacked_bytes" in text
    assert ch.count("fastpath") == 0
    assert not [t for (t,) in ch.query_rows("SHOW TABLES") if t.startswith("fastpath_ingest")]
    # Under the default cap (1 GiB) the same postcan is read whole and the day lands.
    assert ingest(clickhouse, UPLOAD_DAY).success
    assert ch.count("fastpath") == 4


def test_too_many_malformed_members_fail_the_day(clickhouse, ch, fingerprints, bucket) -> None:
    base = real(7)
    good = [member(_variant(base, f"m{n}")) for n in range(20)]
    broken = [member(b"{not json"), member(b"[1, 2]")]
    bucket.put(UPLOAD_DAY, "IT", good + broken)
    result = ingest(clickhouse, UPLOAD_DAY)
    assert not result.success
    text = failure_text(result)
    assert "2 of 22 members malformed" in text and ".post: not_json" in text
    assert ch.count("fastpath") == 0
    # Tolerated when configured: the malformed members are counted, the rest written.
    result = ingest(clickhouse, UPLOAD_DAY, config={"max_malformed_share": 0.1})
    assert result.success
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["skipped"].value == {"not_json": 1, "not_a_measurement": 1}
    assert ch.count("fastpath") == 20


def test_rematerializing_an_upload_day_is_idempotent(clickhouse, ch, fingerprints, bucket) -> None:
    base = real(7)
    bucket.put(UPLOAD_DAY, "IT", [member(_variant(base, f"r{n}")) for n in range(5)])
    # another upload day brought a measurement of the same measurement day
    bucket.put("2024-01-03", "IT", [member(_variant(base, "other-day"))])
    instance = dg.DagsterInstance.ephemeral()
    assert ingest(clickhouse, "2024-01-03", instance).success
    assert ingest(clickhouse, UPLOAD_DAY, instance).success
    first = ch.query_rows("SELECT max(update_time) FROM fastpath")[0][0]
    again = ingest(clickhouse, UPLOAD_DAY, instance)
    assert again.success
    metadata = again.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["dagster/row_count"].value == 0
    assert metadata["measurement_days_changed"].value == []
    assert ch.query_rows("SELECT max(update_time) FROM fastpath")[0][0] == first
    assert ch.scalar("SELECT count() FROM fastpath") == 6
    assert ch.scalar("SELECT uniqExact(measurement_uid) FROM fastpath") == 6


def test_late_upload_reexports_exactly_its_day(
    clickhouse, ch, fingerprints, bucket, local_store_resource
) -> None:
    from ooni_pipeline.definitions import defs

    base = real(7)
    instance = dg.DagsterInstance.ephemeral()
    day1 = [member(_variant(base, "d1a")), member(_variant(base, "d1b"))]
    d2 = _variant(base, "d2")
    d2["measurement_start_time"] = "2024-01-02 08:00:00"
    bucket.put(UPLOAD_DAY, "IT", [*day1, member(d2)])
    # the automation sensor is running before data arrives (its first tick requests
    # nothing); re-exports wait for the daily settle tick (04:30 UTC)
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    start = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=t0)
    assert start.total_requested == 0
    assert ingest(clickhouse, UPLOAD_DAY, instance).success

    resources = {"clickhouse": clickhouse, "object_store": local_store_resource}
    before_tick = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=start.cursor, evaluation_time=t0 + timedelta(hours=4)
    )
    assert before_tick.get_requested_partitions(dg.AssetKey("website_metrics")) == set()
    evaluation = dg.evaluate_automation_conditions(
        defs=defs,
        instance=instance,
        cursor=before_tick.cursor,
        evaluation_time=t0 + timedelta(hours=5),
    )
    requested = evaluation.get_requested_partitions(dg.AssetKey("website_metrics"))
    assert requested == {"2024-01-01", "2024-01-02"}
    for day in sorted(requested):
        assert dg.materialize(
            [website_metrics], resources=resources, partition_key=day, instance=instance
        ).success
    cursor = dg.evaluate_automation_conditions(
        defs=defs,
        instance=instance,
        cursor=evaluation.cursor,
        evaluation_time=t0 + timedelta(hours=6),
    )
    assert cursor.total_requested == 0

    # A late upload, received on 2024-01-05, of a measurement of 2024-01-01.
    late = _variant(base, "late")
    bucket.put("2024-01-05", "IT", [member(late, datetime(2024, 1, 5, 3))])
    assert ingest(clickhouse, "2024-01-05", instance).success
    after = dg.evaluate_automation_conditions(
        defs=defs,
        instance=instance,
        cursor=cursor.cursor,
        evaluation_time=t0 + timedelta(days=1, hours=5),
    )
    assert after.get_requested_partitions(dg.AssetKey("website_metrics")) == {"2024-01-01"}
    assert dg.materialize(
        [website_metrics], resources=resources, partition_key="2024-01-01", instance=instance
    ).success
    data = local_store_resource.get_store().read_bytes(object_key("2024-01-01"))
    assert len(pd.read_csv(io.BytesIO(gzip.decompress(data)))) == 3
    record = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("website_metrics"), asset_partitions=["2024-01-01"]
        ),
        limit=1,
    ).records[0]
    assert record.asset_materialization.metadata["fastpath_data_version"].value.startswith("3@")


def test_observation_records_only_changed_days(clickhouse, ch, fingerprints, bucket) -> None:
    base = real(7)
    instance = dg.DagsterInstance.ephemeral()
    bucket.put(UPLOAD_DAY, "IT", [member(_variant(base, "o1"))])
    assert ingest(clickhouse, UPLOAD_DAY, instance).success

    job = dg.Definitions(
        assets=[fastpath_asset],
        jobs=[dg.define_asset_job("observe", selection=[fastpath_asset])],
        resources={"clickhouse": clickhouse},
    ).resolve_job_def("observe")

    def observe():
        return job.execute_in_process(
            instance=instance,
            tags={
                "dagster/asset_partition_range_start": "2023-12-30",
                "dagster/asset_partition_range_end": "2024-01-02",
            },
        )

    def observations() -> list[str]:
        return [
            e.partition
            for e in instance.fetch_observations(dg.AssetKey("fastpath"), limit=100).records
            for e in [e.event_log_entry.dagster_event.event_specific_data.asset_observation]
        ]

    assert observations() == ["2024-01-01"]  # recorded by the ingestion itself
    assert observe().success
    assert observations() == ["2024-01-01"]  # nothing changed, nothing recorded
    # a row written outside Dagster (as OONI's own fastpath service does)
    ch.command(
        "INSERT INTO fastpath (measurement_uid, test_name, measurement_start_time) "
        "VALUES ('x1', 'web_connectivity', '2023-12-31 10:00:00')"
    )
    assert observe().success
    assert sorted(observations()) == ["2023-12-31", "2024-01-01"]


def test_lineage() -> None:
    from ooni_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()

    def parents(key: str) -> set[str]:
        return {
            k.to_user_string() for k in graph.get(dg.AssetKey.from_user_string(key)).parent_keys
        }

    assert parents("website_metrics") == {"fastpath"}
    assert parents("fastpath") == {"public_fastpath"}
    assert parents("public_fastpath") == {
        "ooni_measurement_bucket",
        "fingerprints_dns",
        "fingerprints_http",
    }
    assert parents("backup/fastpath") == {"fastpath"}
    assert parents("backup/citizenlab") == {"citizenlab"}
    assert graph.get(dg.AssetKey("fastpath")).is_observable


def matched_fingerprints(ch) -> dict[str, list[str]]:
    """measurement_uid -> names of the fingerprints its scores list, in order."""
    return {
        uid: [fp["name"] for fp in json.loads(scores).get("fingerprints", [])]
        for uid, scores in ch.query_rows("SELECT measurement_uid, scores FROM fastpath")
    }


def test_every_body_fingerprint_is_found_as_a_plain_substring(
    clickhouse, ch, fingerprints, bucket
) -> None:
    """The body search runs as escaped Hyperscan literals: each of OONI's body patterns,
    regexp metacharacters and all, must match exactly where Python's ``in`` does."""
    import csv

    with (DATA / "fingerprints_http.csv").open(newline="", encoding="utf-8") as handle:
        body_fps = sorted(
            (row["name"], row["pattern"])
            for row in csv.DictReader(handle)
            if row["location_found"] == "body"
        )
    base = real(7)
    members, expected = [], {}
    for n, (_name, pattern) in enumerate(body_fps):
        msm = _variant(base, f"fp{n}")
        msm["test_keys"]["requests"] = [{"response": {"body": f"<p>{pattern}</p>", "headers": {}}}]
        msm["test_keys"]["queries"] = []
        name, data = member(msm)
        members.append((name, data))
        body = f"<p>{pattern}</p>"
        expected[uid_of(name)] = [fp for fp, p in body_fps if p in body]
    # and a body where each metacharacter is present but no pattern is
    members.append(
        member(
            _variant(base, "none", test_keys__requests=[{"response": {"body": ".*+?()[]{}|^$\\"}}])
        )
    )
    expected[uid_of(members[-1][0])] = []
    bucket.put(UPLOAD_DAY, "IT", members)
    assert ingest(clickhouse, UPLOAD_DAY).success
    assert matched_fingerprints(ch) == expected


def test_every_header_fingerprint_matches_as_oonis_fastpath(
    clickhouse, ch, fingerprints, bucket
) -> None:
    """Headers: names lower-cased, "full" patterns equal, "prefix" patterns start the value
    (a base64 value decoded first), "contains" and "regexp" header patterns never match."""
    import base64
    import csv

    with (DATA / "fingerprints_http.csv").open(newline="", encoding="utf-8") as handle:
        header_fps = sorted(
            (row["name"], row["location_found"][7:], row["pattern_type"], row["pattern"])
            for row in csv.DictReader(handle)
            if row["location_found"].startswith("header.")
        )

    def matches(headers: dict) -> list[str]:
        lowered = {name.lower(): value for name, value in headers.items()}
        found = []
        for name, header, kind, pattern in header_fps:
            value = lowered.get(header)
            if isinstance(value, dict):
                value = (
                    base64.b64decode(value["data"]).decode("latin1") if kind == "prefix" else None
                )
            if (kind == "full" and value == pattern) or (
                kind == "prefix" and isinstance(value, str) and value.startswith(pattern)
            ):
                found.append(name)
        return found

    base = real(7)
    members, expected = [], {}
    for n, (_name, header, kind, pattern) in enumerate(header_fps):
        value = pattern + ("/tail" if kind == "prefix" else "")
        if n % 5 == 0 and kind == "prefix":  # some as base64 objects
            value = {"format": "base64", "data": base64.b64encode(value.encode()).decode()}
        headers = {header.title(): value, "X-Other": "1"}
        msm = _variant(base, f"h{n}")
        msm["test_keys"]["requests"] = [{"response": {"body": "", "headers": headers}}]
        msm["test_keys"]["queries"] = []
        name, data = member(msm)
        members.append((name, data))
        expected[uid_of(name)] = matches(headers)
    assert sum(bool(v) for v in expected.values()) > 100  # full and prefix patterns matched
    assert any(not v for v in expected.values())  # contains / regexp patterns did not
    bucket.put(UPLOAD_DAY, "IT", members)
    assert ingest(clickhouse, UPLOAD_DAY).success
    assert matched_fingerprints(ch) == expected


def _load_fingerprints(ch, without: str | None = None) -> None:
    """The DNS fingerprints of the test data, ``without`` one of them if named."""
    ch.command("TRUNCATE TABLE fingerprints_dns")
    table = parse_fingerprints(
        (DATA / "fingerprints_dns.csv").read_bytes(), "fingerprints_dns", DNS_SCOPES
    ).table
    if without:
        import pyarrow.compute as pc

        table = table.filter(pc.not_equal(table["name"], without))
    ch.insert_arrow("fingerprints_dns", table)


def _latest(ch) -> tuple[str, str]:
    return ch.query_rows(
        "SELECT argMax(confirmed, update_time), argMax(blocking_type, update_time) FROM fastpath"
    )[0]


def test_reingest_puts_back_a_scoring_rolled_back_to_an_earlier_one(
    clickhouse, ch, fingerprints, bucket
) -> None:
    """A fingerprint added (the measurement confirmed), then withdrawn upstream: the
    re-ingest compares with the latest version only, so the earlier scoring comes
    back as the newest version; then nothing more is written."""
    fingerprint = "ooni.ir_10dot10_ipv4_1"
    bucket.put(UPLOAD_DAY, "IR", [member(real(2))])
    instance = dg.DagsterInstance.ephemeral()
    _load_fingerprints(ch, without=fingerprint)
    assert ingest(clickhouse, UPLOAD_DAY, instance).success
    assert _latest(ch) == ("f", "dns")
    _load_fingerprints(ch)  # the fingerprint added
    assert ingest(clickhouse, UPLOAD_DAY, instance).success
    assert _latest(ch) == ("t", "dns")
    _load_fingerprints(ch, without=fingerprint)  # ...and rolled back
    rolled_back = ingest(clickhouse, UPLOAD_DAY, instance)
    assert rolled_back.success
    metadata = rolled_back.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["dagster/row_count"].value == 1
    assert _latest(ch) == ("f", "dns")
    assert ch.scalar("SELECT count() FROM fastpath") == 3
    again = ingest(clickhouse, UPLOAD_DAY, instance)
    metadata = again.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["dagster/row_count"].value == 0
    assert ch.scalar("SELECT count() FROM fastpath") == 3


def test_other_test_names_are_read_but_not_scored_with_web_connectivitys_rules(
    clickhouse, ch, fingerprints, bucket, monkeypatch
) -> None:
    """A telegram measurement whose DNS answer is a confirmed fingerprint's address is
    stored as OONI's fastpath stores a test name it has no scoring for (every
    locality 0.0, accuracy 0.0: msm_failure), not as confirmed blocking; the same
    measurement as web_connectivity still is."""
    monkeypatch.setenv("OONI_PUBLIC_TEST_NAMES", "web_connectivity,telegram")
    telegram = copy.deepcopy(real(2))
    telegram["test_name"] = "telegram"
    telegram["report_id"] = "20240101T000000Z_telegram_IR_197207_n1_t"
    name, data = member(telegram)
    name = name.replace("webconnectivity", "telegram")
    compact = UPLOAD_DAY.replace("-", "")
    bucket.put_raw(
        f"raw/{compact}/10/IR/telegram/{compact}10_IR_telegram.n1.0.tar.gz",
        postcan([(name, data)]),
    )
    bucket.put(UPLOAD_DAY, "IR", [member(real(2))])
    result = ingest(clickhouse, UPLOAD_DAY)
    assert result.success
    found = rows(ch)
    assert len(found) == 2
    by_test = {
        test: row
        for test, row in zip(
            ch.query_rows("SELECT test_name FROM fastpath FINAL ORDER BY measurement_uid"),
            found.itertuples(),
            strict=True,
        )
    }
    other = by_test[("telegram",)]
    assert (other.anomaly, other.confirmed, other.msm_failure, other.blocking_type) == (
        "f",
        "f",
        "t",
        "",
    )
    assert json.loads(other.scores) == {
        "blocking_general": 0.0,
        "blocking_global": 0.0,
        "blocking_country": 0.0,
        "blocking_isp": 0.0,
        "blocking_local": 0.0,
        "accuracy": 0.0,
    }
    web = by_test[("web_connectivity",)]
    assert (web.anomaly, web.confirmed, web.msm_failure, web.blocking_type) == EXPECTED[2][:4]
    assert json.loads(web.scores) == EXPECTED[2][4]


def _fill_years(ch, first: str, days: int, per_day: int) -> None:
    """``days`` measurement days of ``per_day`` live rows each from ``first``."""
    ch.command(
        """INSERT INTO fastpath (measurement_uid, report_id, input, probe_cc, probe_asn, test_name,
            measurement_start_time, anomaly, confirmed, msm_failure, scores)
        SELECT concat('filler-', toString(number)), 'r', 'https://filler.example/', 'IT', 1,
            'web_connectivity',
            toDateTime({first:String}, 'UTC') + toIntervalSecond(intDiv(number, {per:UInt32}) * 86400
                + number % {per:UInt32}),
            'f', 'f', 'f', '{}'
        FROM numbers({n:UInt64})""",
        {"first": f"{first} 00:00:00", "per": per_day, "n": days * per_day},
    )


def test_a_measurement_dated_years_back_reads_its_day_not_the_years_between(
    clickhouse, ch, fingerprints, bucket
) -> None:
    """OONI's fastpath meets probes with bad clocks: one measurement of the upload day
    dated two years back must not make the comparison with live rows read two years."""
    _fill_years(ch, "2022-01-01", days=730, per_day=2000)  # 1.46 M live rows
    base = real(7)
    members = [member(_variant(base, f"now{n}")) for n in range(3)]
    old_clock = _variant(
        base,
        "badclock",
        measurement_start_time="2022-03-04 05:06:07",
        test_start_time="2022-03-04 05:06:00",
    )
    members.append(member(old_clock, received=datetime(2024, 1, 2, 10)))
    bucket.put(UPLOAD_DAY, "IT", members)
    result = ingest(clickhouse, UPLOAD_DAY)
    assert result.success, failure_text(result)
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["dagster/row_count"].value == 4
    assert sorted(metadata["measurement_days_changed"].value) == ["2022-03-04", "2024-01-01"]
    # Read: the granules of two measurement days, not the 1.46 M rows between them.
    assert metadata["live_rows_read_estimate"].value < 30_000
    from ooni_pipeline.fastpath.ingest import estimated_rows

    between = estimated_rows(
        ch,
        "fastpath",
        "measurement_start_time BETWEEN '2022-03-04 05:06:07' AND '2024-01-01 10:00:00'",
        {},
    )
    assert between > 1_000_000  # what the comparison used to read


def test_scratch_tables_are_per_run_and_a_dead_runs_are_dropped(
    clickhouse, ch, fingerprints, bucket
) -> None:
    bucket.put(UPLOAD_DAY, "IT", [member(_variant(real(7), "r1"))])
    instance = dg.DagsterInstance.ephemeral()
    first = ingest(clickhouse, UPLOAD_DAY, instance)
    assert first.success
    ended = first.run_id.replace("-", "")
    unknown = "f" * 32
    # What a killed run leaves, and what an earlier version (named by day only) left.
    leftovers = [
        f"fastpath_ingest_20240102_{ended}_members",
        f"fastpath_ingest_20240102_{unknown}_members",
        "fastpath_ingest_20240102_members",
    ]
    for name in leftovers:
        ch.command(f"CREATE TABLE {name} (x UInt8) ENGINE = Log")
    second = ingest(clickhouse, UPLOAD_DAY, instance)
    assert second.success
    left = [
        r[0]
        for r in ch.query_rows(
            "SELECT name FROM system.tables WHERE database = currentDatabase() "
            "AND startsWith(name, 'fastpath_ingest_') ORDER BY name"
        )
    ]
    assert left == [f"fastpath_ingest_20240102_{unknown}_members"]  # a run nobody here knows
    assert ch.scalar("SELECT count() FROM fastpath") == 1


def test_a_second_run_of_one_upload_day_waits_for_the_first(
    clickhouse, ch, fingerprints, bucket
) -> None:
    """A backfill beside the schedule: while another run ingests the upload day (it
    holds the day's lock), this one waits, then ingests."""
    import threading
    import time

    from ooni_pipeline.clickhouse.lock import exclusive

    bucket.put(UPLOAD_DAY, "IT", [member(_variant(real(7), "r1"))])
    other = exclusive(ch, "public_fastpath_20240102", "other-run", owner_alive=lambda o: True)
    other.__enter__()
    release = threading.Timer(4, lambda: other.__exit__(None, None, None))
    release.start()
    started = time.monotonic()
    instance = dg.DagsterInstance.ephemeral()
    result = ingest(clickhouse, UPLOAD_DAY, instance)
    waited = time.monotonic() - started
    release.join()
    assert result.success
    assert waited >= 4
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("is held by other-run" in m for m in logs), logs
    assert ch.scalar("SELECT count() FROM fastpath") == 1


@pytest.mark.clickhouse_backends("server")
def test_a_server_in_another_time_zone_compares_utc_days(
    clickhouse, ch, fingerprints, bucket, clickhouse_server
) -> None:
    """``measurement_start_time`` is UTC; a server whose time zone is Europe/Rome puts
    23:30 UTC on the next day. Re-ingesting an unchanged measurement writes nothing."""
    late = _variant(
        real(7),
        "late",
        measurement_start_time="2024-01-01 23:30:00",
        test_start_time="2024-01-01 23:29:00",
    )
    bucket.put(UPLOAD_DAY, "IT", [member(late, received=datetime(2024, 1, 2, 1))])
    instance = dg.DagsterInstance.ephemeral()
    with clickhouse_server.server_timezone("Europe/Rome"):
        with clickhouse.connect() as there:
            assert there.scalar("SELECT timezone()") == "Europe/Rome"
        assert ingest(clickhouse, UPLOAD_DAY, instance).success
        again = ingest(clickhouse, UPLOAD_DAY, instance)
    assert again.success
    metadata = again.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["dagster/row_count"].value == 0
    assert metadata["measurement_days_changed"].value == []
    assert ch.scalar("SELECT count() FROM fastpath") == 1


_MISSING = object()
# Values of every JSON type, and strings that read like other types.
_VALUES = (
    _MISSING,
    None,
    "",
    "x",
    "true",
    "false",
    "1",
    0,
    1,
    1.5,
    True,
    False,
    [],
    ["a"],
    {},
    {"a": 1},
)
_FIELDS = (
    "report_id", "probe_cc", "probe_asn", "input", "annotations", "annotations.platform",
    "annotations.architecture", "annotations.engine_name", "test_name", "measurement_start_time",
    "test_start_time", "software_name", "test_version", "test_runtime", "test_helpers",
    "test_helpers.backend", "test_helpers.backend.address", "test_keys", "test_keys.blocking",
    "test_keys.accessible", "test_keys.title_match", "test_keys.http_experiment_failure",
    "test_keys.x_foo_failure", "test_keys.queries", "test_keys.requests",
)  # fmt: skip


def _set(msm: dict, path: str, value) -> dict:
    msm = copy.deepcopy(msm)
    *parents, last = path.split(".")
    target = msm
    for name in parents:
        if not isinstance(target.get(name), dict):
            target[name] = {}
        target = target[name]
    if value is _MISSING:
        target.pop(last, None)
    else:
        target[last] = value
    return msm


def _shapes() -> list[bytes]:
    """Members of every shape: the real measurements, each field of the rules given a
    value of each JSON type, answers, requests, bodies and headers in each of their forms,
    envelopes wrapped every way, and text that is not a measurement."""
    import base64

    location = {"Location": "http://lamanlabuh.aduankonten.id/x"}  # a confirmed prefix
    dns_ip = real(2)["test_keys"]["queries"][0]["answers"][0]["ipv4"]  # a confirmed address
    b64 = base64.b64encode(b"<p>Access Denied</p>").decode()
    base = _variant(real(7), "shape", test_keys__blocking=False)
    msms = [real(n) for n in EXPECTED]
    msms += [_set(base, path, value) for path in _FIELDS for value in _VALUES]
    answers = [
        {"ipv4": None, "hostname": dns_ip}, {"hostname": dns_ip}, {"ipv6": dns_ip},
        {"ipv4": 5, "hostname": dns_ip}, "x", [dns_ip],
    ]  # fmt: skip
    msms += [_set(base, "test_keys.queries", [{"answers": [a]}]) for a in answers]
    msms += [_set(base, "test_keys.queries", q) for q in ([{"answers": {}}], ["x"], [None], {})]
    responses = [
        None, "x", [], {}, {"body": None}, {"body": 5}, {"body": []}, {"body": {}},
        {"body": {"format": "base64", "data": b64}}, {"body": {"format": "base64", "data": "!!"}},
        {"body": {"format": "base64", "data": None}}, {"body": {"format": "base64"}},
        {"body": {"format": "base64", "data": 5}}, {"body": {"format": 5, "data": b64}},
        {"body": {"data": b64}}, {"body": "<p>Access Denied</p>"},
        {"headers": location}, {"headers": []}, {"headers": {"Location": None}},
        {"headers": {"Location": 5}}, {"headers": {"LOCATION": location["Location"]}},
        {"headers": {"Location": {"format": "base64",
                                  "data": base64.b64encode(location["Location"].encode()).decode()}}},
        {"headers": {"Location": {"format": "base64"}}},
        {"headers": {"Location": {"format": "base64", "data": 5}}},
    ]  # fmt: skip
    msms += [_set(base, "test_keys.requests", [{"response": r}]) for r in responses]
    msms += [_set(base, "test_keys.requests", r) for r in ([None], ["x"], [{}], {}, [{"x": 1}])]
    content = json.dumps(base)
    members = [json.dumps({"format": "json", "content": m}).encode() for m in msms]
    members += [
        json.dumps({"format": "json", "content": m}, separators=(",", ":")).encode()
        for m in msms[:10]
    ]
    members += [
        f'{{"content": {content}, "format": "json"}}'.encode(),
        f'  {{"format": "json", "content": {content}}}'.encode(),
        f'{{"format": "JSON", "content": {content}}}'.encode(),
        f'{{"format": null, "content": {content}}}'.encode(),
        f'{{"format": 5, "content": {content}}}'.encode(),
        f'{{"content": {content}}}'.encode(),
        f'{{"format": "json", "content": {content}, "content": {{}}}}'.encode(),
        f'{{"format": "json", "content" : [{content}]}}'.encode(),
        b'{"format": "json", "content": "x"}',
        b'{"format": "json", "content": null}',
        b'{"format": "json"}',
        f'{{"format": "yaml", "content": {content}}}'.encode(),
        f'[{{"format": "json", "content": {content}}}]'.encode(),
        content.encode(),
        content.replace('"test_keys": {', '"test_keys" :[{').replace('}, "test_name"', '}], "test_name"').encode(),
        b"", b"null", b"{", b"[1, 2]", b'"x"', b"\xff\xfe",
    ]  # fmt: skip
    return members


def test_the_typed_reading_scores_every_member_as_the_raw_reading(ch, fingerprints) -> None:
    """Each member is parsed once into typed columns, unless its text or types say the
    typed reading could misread it; then it is read level by level (``JSONExtract*Raw``),
    as it always was. For members of every shape, both readings give the same rows."""
    from ooni_pipeline.fastpath.scoring_sql import SCORING_QUERY_SETTINGS, scoring_select

    members = _shapes()
    ch.command(
        "CREATE TABLE shapes (member_key String, member_name String, raw String) ENGINE = Memory"
    )
    ch.insert_df(
        "shapes",
        pd.DataFrame(
            {
                "member_key": ["raw/20240102/10/IT/webconnectivity/x.tar.gz"] * len(members),
                "member_name": [member(m)[0] for m in members],
                "raw": members,
            }
        ),
    )

    def scored(typed: bool) -> list[tuple]:
        return ch.query_rows(
            f"SELECT * FROM ({scoring_select('shapes', typed_reading=typed)}) ORDER BY member_name "
            f"SETTINGS {SCORING_QUERY_SETTINGS}"
        )

    typed, raw = scored(True), scored(False)
    assert len(typed) == len(members)
    assert [r for r in typed if r not in raw] == []
    reasons = {row[2] for row in raw}
    assert {"", "not_json", "not_a_measurement", "no_report_id", "bad_field", "yaml"} <= reasons
    confirmed = [row for row in raw if row[2] == "" and '"confirmed":true' in row[12]]
    assert len(confirmed) > 10  # confirmed by DNS, body and header fingerprints
