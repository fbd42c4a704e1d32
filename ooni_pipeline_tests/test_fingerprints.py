"""The fingerprint updater against the local upstream server and real chdb."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import pytest

from ooni_pipeline.clickhouse import ClickHouse
from ooni_pipeline.clickhouse.schema import DNS_SCOPES, HTTP_SCOPES
from ooni_pipeline.fingerprints.assets import (
    fingerprints_dns,
    fingerprints_dns_check,
    fingerprints_http,
    fingerprints_http_check,
)
from ooni_pipeline.fingerprints.definitions import fingerprints_schedule
from ooni_pipeline.fingerprints.parse import HEADER, FingerprintError, parse_fingerprints
from ooni_pipeline_tests.rig import Reply, UpstreamServer, failure_text, materialization_metadata

HEADER_LINE = ",".join(HEADER)


def _dns_csv(rows: int = 150, extra: str = "") -> str:
    lines = [HEADER_LINE]
    for i in range(rows):
        scope = DNS_SCOPES[i % len(DNS_SCOPES)]
        pattern_type = ("full", "prefix", "contains", "regexp")[i % 4]
        pattern = rf"^10\.10\.{i}\.\d+$" if pattern_type == "regexp" else f"10.10.{i}.1"
        lines.append(
            f'dns_xx_{i:03d},{scope},,dns,{pattern_type},{pattern},{i % 256},"IR,RU",https://x.org/{i},,"note, with comma"'
        )
    return "\r\n".join(lines) + "\r\n" + extra


def _http_csv(rows: int = 120) -> str:
    lines = ["\ufeff" + HEADER_LINE]
    for i in range(rows):
        scope = HTTP_SCOPES[i % len(HTTP_SCOPES)]
        lines.append(
            f'http_xx_{i:03d},{scope},"a, b",body,contains,<title>Blocked {i}</title>,1,,,,'
        )
    return "\n".join(lines) + "\n"


@pytest.fixture
def sources(upstream: UpstreamServer, monkeypatch: pytest.MonkeyPatch) -> UpstreamServer:
    monkeypatch.setenv(
        "OONI_FINGERPRINTS_DNS_URL", upstream.put("fingerprints_dns.csv", _dns_csv())
    )
    monkeypatch.setenv(
        "OONI_FINGERPRINTS_HTTP_URL", upstream.put("fingerprints_http.csv", _http_csv())
    )
    return upstream


def _run(clickhouse, instance, assets=(fingerprints_dns, fingerprints_dns_check), run_config=None):
    return dg.materialize(
        list(assets),
        resources={"clickhouse": clickhouse},
        instance=instance,
        raise_on_error=False,
        run_config=run_config,
    )


def test_both_tables_land_exactly(clickhouse, ch: ClickHouse, sources) -> None:
    result = _run(
        clickhouse,
        dg.DagsterInstance.ephemeral(),
        [fingerprints_dns, fingerprints_http, fingerprints_dns_check, fingerprints_http_check],
    )
    assert result.success
    assert ch.count("fingerprints_dns") == 150 and ch.count("fingerprints_http") == 120
    row = ch.query_rows(
        "SELECT scope, pattern_type, pattern, confidence_no_fp, expected_countries, notes, other_names "
        "FROM fingerprints_dns WHERE name = 'dns_xx_003'"
    )
    assert row == [("inst", "regexp", r"^10\.10\.3\.\d+$", 3, "IR,RU", "note, with comma", "")]
    assert ch.query_rows(
        "SELECT other_names, pattern FROM fingerprints_http WHERE name = 'http_xx_007'"
    ) == [("a, b", "<title>Blocked 7</title>")]
    assert ch.scalar("SELECT count() FROM fingerprints_http WHERE scope = 'prov'") == 15
    meta = materialization_metadata(result, "fingerprints_dns")
    assert meta["dagster/row_count"] == 150
    assert meta["rows_per_scope"]["nat"] == 25 and meta["rows_per_pattern_type"]["regexp"] == 37
    assert meta["source_etag"]
    assert all(c.passed for c in result.get_asset_check_evaluations())


def test_unchanged_etag_skips_the_rewrite(clickhouse, ch, sources) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    again = _run(clickhouse, instance)
    assert again.success and materialization_metadata(again, "fingerprints_dns")["skipped"] is True
    assert sources.hits("fingerprints_dns.csv") == [200, 304]
    sources.put("fingerprints_dns.csv", _dns_csv(160))
    third = _run(clickhouse, instance)
    assert materialization_metadata(third, "fingerprints_dns")["dagster/row_count"] == 160


def test_a_new_url_is_fetched_whole_not_with_the_old_validators(
    clickhouse, ch, sources, monkeypatch
) -> None:
    """Moving to a mirror whose (valid, different) file is older than the last fetch
    rewrites the table from the mirror: the old URL's validators stay with it.
    (Servers without ETags, so Last-Modified is the validator.)"""
    instance = dg.DagsterInstance.ephemeral()
    sources.put(
        "fingerprints_dns.csv",
        _dns_csv(150),
        last_modified=datetime(2026, 11, 10, tzinfo=UTC),
        etag=False,
    )
    assert _run(clickhouse, instance).success
    mirror = sources.put(
        "mirror/fingerprints_dns.csv",
        _dns_csv(140),
        last_modified=datetime(2026, 11, 1, tzinfo=UTC),
        etag=False,
    )
    monkeypatch.setenv("OONI_FINGERPRINTS_DNS_URL", mirror)
    moved = _run(clickhouse, instance)
    meta = materialization_metadata(moved, "fingerprints_dns")
    assert meta["skipped"] is False and meta["source_url"] == mirror
    assert ch.count("fingerprints_dns") == 140
    assert sources.hits("mirror/fingerprints_dns.csv") == [200]
    again = _run(clickhouse, instance)
    assert materialization_metadata(again, "fingerprints_dns")["skipped"] is True
    assert sources.hits("mirror/fingerprints_dns.csv") == [200, 304]


def test_500_then_success_is_retried(clickhouse, ch, sources) -> None:
    sources.fail("fingerprints_dns.csv", Reply(500), Reply(502))
    assert _run(clickhouse, dg.DagsterInstance.ephemeral()).success
    assert sources.hits("fingerprints_dns.csv") == [500, 502, 200]


BAD_BODIES = {
    "bad enum": (
        _dns_csv(extra="bad1,galaxy,,dns,full,1.2.3.4,1,,,,\n"),
        "line 152: field 'scope': 'galaxy'",
    ),
    "bad pattern type": (
        _dns_csv(extra="bad1,nat,,dns,fuzzy,1.2.3.4,1,,,,\n"),
        "field 'pattern_type': 'fuzzy'",
    ),
    "duplicate name": (
        _dns_csv(extra="dns_xx_004,nat,,dns,full,1.2.3.4,1,,,,\n"),
        "'dns_xx_004' duplicates line 6",
    ),
    "invalid regexp": (
        _dns_csv(extra="bad1,nat,,dns,regexp,([a-z,1,,,,\n"),
        "field 'pattern': invalid regexp",
    ),
    "regexp RE2 refuses": (
        _dns_csv(extra="lookbehind,nat,,dns,regexp,(?<=a)b,1,,,,\n"),
        "fingerprint 'lookbehind': field 'pattern': ClickHouse cannot compile '(?<=a)b'",
    ),
    "bad confidence": (
        _dns_csv(extra="bad1,nat,,dns,full,1.2.3.4,300,,,,\n"),
        "field 'confidence_no_fp': '300'",
    ),
    "wrong field count": (
        _dns_csv(extra="bad1,nat,,dns,full\n"),
        "line 152: 5 fields, expected 11",
    ),
    "html": ("<!DOCTYPE html><html><body>Rate limited</body></html>", "the body is HTML, not CSV"),
    "json": ('{"message": "Not Found"}', "the body is JSON, not CSV"),
    "wrong header": ("name,scope,pattern\nx,nat,1\n", "line 1: header is"),
    "too few rows": (_dns_csv(50), "outside the sanity bounds"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_input_fails_and_keeps_the_live_table(clickhouse, ch, sources, case: str) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    before = ch.query_rows("SELECT * FROM fingerprints_dns ORDER BY name")
    body, message = BAD_BODIES[case]
    sources.put("fingerprints_dns.csv", body)
    result = _run(clickhouse, instance)
    assert not result.success
    assert message in failure_text(result)
    assert "fingerprints_dns.csv" in failure_text(result) or "sanity" in failure_text(result)
    assert ch.query_rows("SELECT * FROM fingerprints_dns ORDER BY name") == before


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply(404, b"nope"), "HTTP 404"),
        (Reply(200, _dns_csv().encode(), truncate_to=3000), "truncated"),
    ],
)
def test_fetch_failures_keep_the_live_table(
    clickhouse, ch, sources, reply: Reply, message: str
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    sources.put("fingerprints_dns.csv", _dns_csv(170))  # a new version, but fetching it fails
    sources.fail("fingerprints_dns.csv", reply)
    result = _run(clickhouse, instance)
    assert not result.success and message in failure_text(result)
    assert ch.count("fingerprints_dns") == 150


def test_parse_rejects_an_empty_name() -> None:
    with pytest.raises(FingerprintError, match="line 2: field 'name' is empty"):
        parse_fingerprints(f"{HEADER_LINE}\n,nat,,dns,full,x,1,,,,\n".encode(), "f.csv", DNS_SCOPES)


def test_http_scopes_are_not_valid_for_dns() -> None:
    body = f"{HEADER_LINE}\nx,injb,,dns,full,x,1,,,,\n".encode()
    assert parse_fingerprints(body, "h.csv", HTTP_SCOPES).table.num_rows == 1
    with pytest.raises(FingerprintError, match="'injb' is not one of"):
        parse_fingerprints(body, "d.csv", DNS_SCOPES)


MARKER = "MARKER-3f9a-upstream-text"
LONG = "x" * 50 + MARKER  # the marker lies past any short excerpt


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (f"{HEADER_LINE},{LONG}\n", "f.csv: line 1: header is 'name,scope,"),
        (f"{HEADER_LINE}\nx,{LONG},,dns,full,x,1,,,,\n", "line 2: field 'scope': 'xxx"),
        (f"{HEADER_LINE}\nx,nat,,dns,{LONG},x,1,,,,\n", "line 2: field 'pattern_type': 'xxx"),
        (
            f"{HEADER_LINE}\nx,nat,,dns,regexp,({LONG},1,,,,\n",
            "line 2: field 'pattern': invalid regexp '(xxx",
        ),
        (
            f"{HEADER_LINE}\nx,nat,,dns,full,x,{LONG},,,,\n",
            "line 2: field 'confidence_no_fp': 'xxx",
        ),
        (
            f"{HEADER_LINE}\n{LONG},nat,,dns,full,x,1,,,,\n{LONG},nat,,dns,full,x,1,,,,\n",
            "line 3: field 'name': 'xxx",
        ),
    ],
    ids=["header", "scope", "pattern_type", "regexp", "confidence", "duplicate name"],
)
def test_errors_quote_a_short_escaped_excerpt_at_most(body: str, message: str) -> None:
    with pytest.raises(FingerprintError) as info:
        parse_fingerprints(body.encode(), "f.csv", DNS_SCOPES)
    assert message in str(info.value) and "more characters" in str(info.value)
    assert MARKER not in str(info.value)


def test_a_pattern_re2_refuses_is_quoted_short(clickhouse, ch, sources) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    sources.put(
        "fingerprints_dns.csv", _dns_csv(extra=f"lookbehind,nat,,dns,regexp,(?<=a)b{LONG},1,,,,\n")
    )
    result = _run(clickhouse, instance)
    assert not result.success
    text = failure_text(result)
    assert (
        "fingerprint 'lookbehind': field 'pattern': ClickHouse cannot compile '(?<=a)bxxx" in text
    )
    assert "invalid perl operator" in text and MARKER not in text
    assert ch.count("fingerprints_dns") == 150


def test_schedule() -> None:
    assert fingerprints_schedule.name == "fingerprints_schedule"
    assert fingerprints_schedule.cron_schedule == "5 * * * *"


def test_the_operators_tables_keep_their_definition(
    clickhouse, ch, sources, operator_tables
) -> None:
    """EmbeddedRocksDB with an operator's column and comment: exchanged with an exact
    copy of itself, the live name keeps its definition, whatever the number of runs."""
    names = ("fingerprints_dns", "fingerprints_http")
    before = operator_tables(*names)
    assets = [fingerprints_dns, fingerprints_http, fingerprints_dns_check, fingerprints_http_check]
    instance = dg.DagsterInstance.ephemeral()
    forced = {"ops": {n: {"config": {"force": True}} for n in names}}
    for run_config in (None, forced, forced):
        assert _run(clickhouse, instance, assets, run_config).success
        assert operator_tables(*names) == before
        assert ch.count("fingerprints_dns") == 150 and ch.count("fingerprints_http") == 120
    assert ch.query_rows("SELECT DISTINCT reviewed FROM fingerprints_dns") == [(0,)]
