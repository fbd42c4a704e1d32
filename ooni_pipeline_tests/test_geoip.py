"""The GeoIP downloader with mmdb files built here, served by the local upstream server."""

from __future__ import annotations

import gzip
from pathlib import Path

import dagster as dg
import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from ooni_pipeline.geoip.assets import GeoIPConfig, geoip_db, geoip_db_lookup_check
from ooni_pipeline.geoip.definitions import geoip_db_schedule
from ooni_pipeline.geoip.mmdb import previous_month, release_ver
from ooni_pipeline_tests.rig import (
    PeakFileSize,
    Reply,
    UpstreamServer,
    bomb,
    failure_text,
    materialization_metadata,
)

TODAY = "2026-11-03"
THIS, LAST = "20261101", "20261001"


def build_mmdb(
    path: Path, asn: int = 15169, with_asn: bool = True, database_type: str = "ooni-ip2country-as"
) -> bytes:
    writer = MMDBWriter(ip_version=4, database_type=database_type)
    record = {
        "country": "US",
        "autonomous_system_organization": "GOOGLE",
        "autonomous_system_name": "GOOGLE",
        "autonomous_system_country": "US",
    }
    if with_asn:
        record["autonomous_system_number"] = asn
    writer.insert_network(IPSet(["8.8.8.0/24"]), record)
    writer.insert_network(
        IPSet(["1.1.1.0/24"]), {**record, "country": "AU", "autonomous_system_number": 13335}
    )
    writer.to_db_file(str(path))
    return path.read_bytes()


@pytest.fixture
def geo(tmp_path: Path, upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch):
    directory = tmp_path / "geoip"
    monkeypatch.setenv("OONI_GEOIP_DIR", str(directory))
    monkeypatch.setenv(
        "OONI_GEOIP_URL_TEMPLATE", upstream.url("releases/{ver}/{ver}-ip2country_as.mmdb.gz")
    )

    def publish(ver: str, body: bytes) -> None:
        upstream.put(f"releases/{ver}/{ver}-ip2country_as.mmdb.gz", body)

    return directory, publish, upstream


def _good(tmp_path: Path, asn: int) -> tuple[bytes, bytes]:
    raw = build_mmdb(tmp_path / f"src-{asn}.mmdb", asn=asn)
    return raw, gzip.compress(raw)


def _run(today: str = TODAY, **config):
    return dg.materialize(
        [geoip_db, geoip_db_lookup_check],
        run_config={"ops": {"geoip_db": {"config": {"today": today, **config}}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".partial")]


def test_first_install(tmp_path, geo) -> None:
    directory, publish, _ = geo
    raw, gz = _good(tmp_path, 15169)
    publish(THIS, gz)
    result = _run()
    assert result.success
    assert (directory / "asn_cc.mmdb").read_bytes() == raw
    assert (directory / "geoipdbts").read_text() == THIS
    meta = materialization_metadata(result)
    assert (
        meta["release"] == THIS
        and meta["bytes"] == len(raw)
        and meta["bytes_downloaded"] == len(gz)
    )
    assert (
        meta["ip_version"] == 4
        and meta["database_type"] == "ooni-ip2country-as"
        and meta["node_count"] > 0
    )
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.metadata["probe_asn"].value == 15169
    assert _no_temp_files(directory)


def test_already_up_to_date_is_skipped(tmp_path, geo) -> None:
    directory, publish, upstream = geo
    publish(THIS, _good(tmp_path, 15169)[1])
    assert _run().success
    again = _run()
    assert again.success and materialization_metadata(again)["skipped"] is True
    assert upstream.hits(f"releases/{THIS}/{THIS}-ip2country_as.mmdb.gz") == [200]


def test_new_month_replaces_the_file(tmp_path, geo) -> None:
    directory, publish, _ = geo
    publish(LAST, _good(tmp_path, 1)[1])
    assert _run("2026-10-20").success
    raw, gz = _good(tmp_path, 2)
    publish(THIS, gz)
    assert _run().success
    assert (directory / "asn_cc.mmdb").read_bytes() == raw and (
        directory / "geoipdbts"
    ).read_text() == THIS


def test_404_this_month_keeps_a_valid_existing_file(tmp_path, geo) -> None:
    directory, publish, _ = geo
    publish(LAST, _good(tmp_path, 1)[1])
    assert _run("2026-10-20").success
    before = (directory / "asn_cc.mmdb").read_bytes()
    result = _run()  # November is not published yet
    assert result.success
    meta = materialization_metadata(result)
    assert meta["kept_previous"] is True and meta["release"] == LAST
    assert (directory / "asn_cc.mmdb").read_bytes() == before and (
        directory / "geoipdbts"
    ).read_text() == LAST


def test_404_without_a_file_falls_back_to_last_month_only(tmp_path, geo) -> None:
    directory, publish, upstream = geo
    publish(LAST, _good(tmp_path, 7)[1])
    result = _run()
    assert result.success
    assert materialization_metadata(result)["fallback_to_previous_month"] is True
    assert (directory / "geoipdbts").read_text() == LAST

    assert _no_temp_files(directory)

    # Neither this month nor last month: fail, never an older release.
    older = "releases/20260901/20260901-ip2country_as.mmdb.gz"
    upstream.remove(f"releases/{LAST}/{LAST}-ip2country_as.mmdb.gz")
    upstream.put(older, _good(tmp_path, 8)[1])
    for name in ("asn_cc.mmdb", "geoipdbts"):
        (directory / name).unlink()
    failed = _run()
    assert not failed.success and "neither 20261101 nor 20261001 is published" in failure_text(
        failed
    )
    # The two 404s leave the directory as they found it: no database, no release stamp,
    # no temporary file of either attempt; the older release is never asked for.
    assert sorted(p.name for p in directory.iterdir()) == []
    assert upstream.hits(older) == []


BAD = {
    "corrupt gzip": (lambda tmp: b"\x1f\x8b\x08\x00garbage-not-deflate" * 50, "not a valid gzip"),
    "truncated gzip": (lambda tmp: _good(tmp, 9)[1][:-40], "truncated"),
    "gzip of a non-mmdb": (
        lambda tmp: gzip.compress(b"<html>not a database</html>" * 100),
        "not a readable mmdb",
    ),
    "mmdb without ASN": (
        lambda tmp: gzip.compress(build_mmdb(tmp / "noasn.mmdb", with_asn=False)),
        "no integer autonomous_system_number",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_download_leaves_the_previous_file_byte_for_byte(tmp_path, geo, case: str) -> None:
    directory, publish, _ = geo
    publish(LAST, _good(tmp_path, 1)[1])
    assert _run("2026-10-20").success
    before = {name: (directory / name).read_bytes() for name in ("asn_cc.mmdb", "geoipdbts")}
    make, message = BAD[case]
    publish(THIS, make(tmp_path))
    result = _run()
    assert not result.success and message in failure_text(result)
    assert {name: (directory / name).read_bytes() for name in before} == before
    assert _no_temp_files(directory)


def test_a_gzip_bomb_stops_at_the_cap_and_leaves_the_installed_file(tmp_path, geo) -> None:
    directory, publish, _ = geo
    publish(LAST, _good(tmp_path, 1)[1])
    assert _run("2026-10-20").success
    before = {name: (directory / name).read_bytes() for name in ("asn_cc.mmdb", "geoipdbts")}
    cap = 4 << 20
    publish(THIS, bomb("gzip", 64 << 20))  # 64 KB served, 64 MiB of zeros unpacked
    with PeakFileSize(directory, "*.partial") as written:
        result = _run(max_unpacked_bytes=cap)
    assert not result.success
    text = failure_text(result)
    assert f"{THIS}-ip2country_as.mmdb.gz unpacks to more than {cap} bytes" in text
    assert "max_unpacked_bytes" in text
    assert written.peak <= cap, written.peak
    assert {name: (directory / name).read_bytes() for name in before} == before
    assert _no_temp_files(directory)
    # A release of ordinary size still installs under the same cap.
    raw, gz = _good(tmp_path, 2)
    publish(THIS, gz)
    assert _run(max_unpacked_bytes=cap).success
    assert (directory / "asn_cc.mmdb").read_bytes() == raw


def test_the_default_cap_is_one_gib() -> None:
    assert GeoIPConfig().max_unpacked_bytes == 1 << 30


def test_server_error_then_success(tmp_path, geo) -> None:
    directory, publish, upstream = geo
    publish(THIS, _good(tmp_path, 3)[1])
    upstream.fail(f"releases/{THIS}/{THIS}-ip2country_as.mmdb.gz", Reply(503))
    assert _run().success


def test_check_fails_without_a_file(geo) -> None:
    assert not geoip_db_lookup_check().passed


def test_release_dates() -> None:
    from datetime import date

    assert release_ver(date(2026, 1, 31)) == "20260101"
    assert previous_month(date(2026, 1, 5)) == date(2025, 12, 1)
    assert (
        geoip_db_schedule.cron_schedule == "0 0 * * 0"
        and geoip_db_schedule.execution_timezone == "UTC"
    )
