"""The ASN metadata updater against the local upstream server and real chdb."""

from __future__ import annotations

import json
from datetime import date

import dagster as dg
import pytest

from ooni_pipeline.asn_metadata.assets import asnmeta, asnmeta_rows_check
from ooni_pipeline.asn_metadata.definitions import asnmeta_schedule
from ooni_pipeline.asn_metadata.parse import (
    AsnMetaError,
    ParseStats,
    arrow_batches,
    iter_asn_histories,
    iter_member_runs,
)
from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline_tests.rig import (
    Reply,
    UpstreamServer,
    bomb,
    failure_text,
    materialization_metadata,
)

SMALL = {
    "ops": {
        "asnmeta": {
            "config": {"min_rows_exclusive": 10, "max_rows_exclusive": 100_000, "batch_rows": 700}
        }
    }
}


def _map(asns: int = 1500) -> dict:
    data = {}
    for asn in range(1, asns + 1):
        history = [[f"Org {asn}, Inc.", "IT", "20180101", f"AS{asn}-NET", "RIPE"]]
        if asn % 3 == 0:
            history.append([f'Orgé "{asn}" new', "DE", "20230215", "", "ARIN"])
        data[str(asn)] = history
    data["4294967295"] = [["Max", "ZZ", "20240229", "MAX", "IANA"]]
    return data


def _body(data: dict) -> bytes:
    return json.dumps(data, ensure_ascii=False, indent=1).replace("\n", "\r\n").encode()


@pytest.fixture
def source(upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch) -> UpstreamServer:
    monkeypatch.setenv("OONI_ASNMETA_URL", upstream.put("all_as_org_map.json", _body(_map())))
    return upstream


def _run(clickhouse, instance, run_config=SMALL):
    return dg.materialize(
        [asnmeta, asnmeta_rows_check],
        resources={"clickhouse": clickhouse},
        instance=instance,
        run_config=run_config,
        raise_on_error=False,
    )


def test_realistic_map_lands_exactly(clickhouse, ch: ClickHouse, source) -> None:
    result = _run(clickhouse, dg.DagsterInstance.ephemeral())
    assert result.success
    expected_rows = 1500 + 500 + 1
    assert ch.count("asnmeta") == expected_rows
    assert ch.query_rows(
        "SELECT org_name, cc, changed, aut_name, source FROM asnmeta WHERE asn = 3 ORDER BY changed"
    ) == [
        ("Org 3, Inc.", "IT", date(2018, 1, 1), "AS3-NET", "RIPE"),
        ('Orgé "3" new', "DE", date(2023, 2, 15), "", "ARIN"),
    ]
    assert ch.query_rows("SELECT asn, changed FROM asnmeta WHERE org_name = 'Max'") == [
        (4294967295, date(2024, 2, 29))
    ]
    meta = materialization_metadata(result)
    assert meta["dagster/row_count"] == expected_rows
    assert meta["distinct_asns"] == 1501
    assert meta["newest_changed"] == "2024-02-29"
    assert meta["bytes_fetched"] == len(_body(_map()))
    assert all(c.passed for c in result.get_asset_check_evaluations())


def test_unchanged_source_skips_and_500_is_retried(clickhouse, ch, source) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    source.fail("all_as_org_map.json", Reply(500))
    again = _run(clickhouse, instance)
    assert again.success and materialization_metadata(again)["skipped"] is True
    assert source.hits("all_as_org_map.json") == [200, 500, 304]


BAD = {
    "empty {} fails the default bounds": (b"{}", "outside the sanity bounds", None),
    "truncated JSON": (_body(_map())[:20_000], "truncated JSON", SMALL),
    "non-integer ASN": (
        _body({**_map(), "AS12": [["a", "b", "20200101", "c", "d"]]}),
        "ASN 'AS12': not an integer",
        SMALL,
    ),
    "ASN too large": (
        _body({**_map(), "4294967296": [["a", "b", "20200101", "c", "d"]]}),
        "ASN '4294967296'",
        SMALL,
    ),
    "4-field entry": (
        _body({**_map(), "7": [["a", "b", "20200101", "c"]]}),
        "ASN 7: entry 0 has 4 fields",
        SMALL,
    ),
    "null field": (
        _body({**_map(), "6": [["a", None, "20200101", "c", "d"]]}),
        "ASN 6: entry 0: field 'cc' is None, expected a string",
        SMALL,
    ),
    "bad date": (
        _body({**_map(), "8": [["a", "b", "2020-01-01", "c", "d"]]}),
        "ASN 8: field 'changed' is '2020-01-01'",
        SMALL,
    ),
    "impossible date": (
        _body({**_map(), "9": [["a", "b", "20230230", "c", "d"]]}),
        "ASN 9: field 'changed'",
        SMALL,
    ),
    "HTML": (
        b"<!DOCTYPE html><html>Service unavailable</html>",
        "the body is HTML, not JSON",
        SMALL,
    ),
    "not an object": (b"[1, 2]", "expected '{' opening the AS map", SMALL),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_and_keeps_the_live_table(clickhouse, ch, source, case: str) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    before = ch.count("asnmeta")
    body, message, run_config = BAD[case]
    source.put("all_as_org_map.json", body)
    result = _run(clickhouse, instance, run_config=run_config)
    assert not result.success
    assert message in failure_text(result)
    assert ch.count("asnmeta") == before


def test_truncated_transfer_keeps_the_live_table(clickhouse, ch, source) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    source.put("all_as_org_map.json", _body(_map(1600)))
    source.fail("all_as_org_map.json", Reply(200, _body(_map(1600)), truncate_to=30_000))
    result = _run(clickhouse, instance)
    assert not result.success and "truncated" in failure_text(result)
    assert ch.count("asnmeta") == 2001


GiB = 1 << 30


def test_a_content_encoding_bomb_stops_at_the_default_cap(clickhouse, ch, source) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    # About 1.1 MB on the wire: an AS map opening, then 1.1 GiB of JSON whitespace once
    # requests has undone the Content-Encoding (built in about two seconds).
    body = bomb("gzip", GiB + (64 << 20), b'{"1": ', b" ")
    source.fail("all_as_org_map.json", Reply(200, body, {"Content-Encoding": "gzip"}))
    result = _run(clickhouse, instance)
    assert not result.success
    assert f"all_as_org_map.json unpacks to more than {GiB} bytes" in failure_text(result)
    assert ch.count("asnmeta") == 2001


def _chunks(body: bytes, size: int):
    for i in range(0, len(body), size):
        yield body[i : i + size]


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_parser_is_independent_of_chunk_boundaries(chunk_size: int) -> None:
    data = _map(60)
    stats = ParseStats()
    tables = list(
        arrow_batches(
            iter_member_runs(_chunks(_body(data), chunk_size), stats), stats, batch_rows=25
        )
    )
    assert len(tables) > 1
    rows = [row for table in tables for row in table.to_pylist()]
    assert len(rows) == sum(len(h) for h in data.values()) == stats.rows
    assert rows[0] == {
        "asn": 1,
        "org_name": "Org 1, Inc.",
        "cc": "IT",
        "changed": date(2018, 1, 1),
        "aut_name": "AS1-NET",
        "source": "RIPE",
    }


def test_trailing_garbage_is_an_error() -> None:
    with pytest.raises(AsnMetaError, match="unexpected data after"):
        list(iter_asn_histories([b'{"1": []} {"2": []}']))


MARKER = "MARKER-77d2-upstream-text"
LONG = "x" * 50 + MARKER  # the marker lies past any short excerpt


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_body({"AS" + LONG: []}), "ASN 'ASxxx"),
        (_body({"1": [["a", "b", "2020" + LONG, "c", "d"]]}), "ASN 1: field 'changed' is '2020xxx"),
        (_body({"1": [["a", {"k": LONG}, "20200101", "c", "d"]]}), "field 'cc' is {'k': 'xxx"),
        (f'{{"{LONG}" []}}'.encode(), "expected ':' after ASN 'xxx"),
        (f'{{["{LONG}"]: []}}'.encode(), "expected an ASN string key, found ['xxx"),
    ],
    ids=["ASN key", "date", "non-string field", "after a key", "non-string key"],
)
def test_errors_quote_a_short_escaped_excerpt_at_most(body: bytes, message: str) -> None:
    stats = ParseStats()
    with pytest.raises(AsnMetaError) as info:
        list(arrow_batches(iter_member_runs([body], stats), stats))
    assert message in str(info.value) and MARKER not in str(info.value)


def test_schedule() -> None:
    assert (
        asnmeta_schedule.name == "asnmeta_schedule"
        and asnmeta_schedule.cron_schedule == "0 3 * * 1"
    )


def test_strings_that_look_like_member_boundaries_parse_exactly() -> None:
    """A name ending in ']],' fakes a boundary for the bulk decoder: its slice is then
    invalid JSON and the member-by-member path takes over, with the same result."""
    data = {
        str(asn): [[f"Evil {asn} ]],", "IT", "20200101", 'x]], "2": [["', "RIPE"]]
        for asn in range(1, 600)
    }
    expected = [(int(k), v[0][0], v[0][3]) for k, v in data.items()]
    for chunk_size in (997, 1 << 20):
        stats = ParseStats()
        runs = iter_member_runs(_chunks(_body(data), chunk_size), stats)
        rows = [
            (r["asn"], r["org_name"], r["aut_name"])
            for table in arrow_batches(runs, stats, batch_rows=100)
            for r in table.to_pylist()
        ]
        assert rows == expected


def test_the_operators_table_keeps_its_definition(clickhouse, ch, source, operator_tables) -> None:
    before = operator_tables("asnmeta")
    instance = dg.DagsterInstance.ephemeral()
    forced = {"ops": {"asnmeta": {"config": {**SMALL["ops"]["asnmeta"]["config"], "force": True}}}}
    for run_config in (SMALL, forced, forced):
        assert _run(clickhouse, instance, run_config).success
        assert operator_tables("asnmeta") == before
        assert ch.count("asnmeta") == 1500 + 500 + 1
    assert ch.scalar("SELECT countIf(loaded_at > '2020-01-01') FROM asnmeta") == 2001
