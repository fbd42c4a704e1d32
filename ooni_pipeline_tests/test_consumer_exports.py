"""The consumer exports (watchlists, aggregates, Parquet, manifest) on real chdb,
both ClickHouse back ends, moto S3 and the local store, read back with csv, pandas
and pyarrow, values asserted exactly."""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from ooni_pipeline.clickhouse import ClickHouseResource
from ooni_pipeline.exports import aggregates, parquet, watchlists
from ooni_pipeline.exports.consumer_schedules import (
    consumer_exports_daily_schedule,
    website_metrics_monthly_schedule,
)
from ooni_pipeline.exports.daily_consumers import build_daily_consumer_exports
from ooni_pipeline.exports.manifest import MANIFEST_KEY, load_exports_manifest
from ooni_pipeline.exports.watchlist_file import (
    Consumer,
    WatchlistError,
    load_consumers,
    load_watchlists,
    normalize_domain,
)
from ooni_pipeline.exports.website_metrics import object_key as wm_key
from ooni_pipeline.exports.website_metrics import website_metrics
from ooni_pipeline.exports.website_metrics_sql import CATEGORIES, CSV_COLUMNS
from ooni_pipeline.fastpath.versions import day_versions
from ooni_pipeline.object_store import ObjectStoreResource
from ooni_pipeline_tests.rig import failure_text
from ooni_pipeline_tests.test_automation import materialized_by_a_run
from ooni_pipeline_tests.test_exports import CASES, DAY, _expected, _insert, _msm, day_rows

__all__ = ["day_rows"]  # the fixture, shared with test_exports

WATCHLIST = """\
consumers:
  bbc: [bbc.com, BBC.co.uk]
  dw:
    - dw.com
  quiet: [nowhere.example]
"""


def _csv(store, key: str) -> list[dict[str, str]]:
    text = gzip.decompress(store.read_bytes(key)).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text, newline="")))


DAILY = aggregates.DAILY_KEY
PARQUET = parquet.WEBSITE_METRICS_PARQUET_KEY
MONTHLY = aggregates.MONTHLY_KEY


def _run(keys, clickhouse, store_resource, partition, instance=None, config=None, lists=None):
    """Materialize the assets ``keys`` (and their checks) of one partition."""
    daily, daily_checks = build_daily_consumer_exports(lists or {})
    op = "website_metrics_monthly" if MONTHLY in keys else "consumer_exports_daily"
    return dg.materialize(
        [
            daily,
            aggregates.website_metrics_monthly,
            *daily_checks,
            aggregates.website_metrics_monthly_check,
        ],
        selection=dg.AssetSelection.assets(*keys),
        resources={"clickhouse": clickhouse, "object_store": store_resource},
        partition_key=partition,
        instance=instance or dg.DagsterInstance.ephemeral(),
        run_config={"ops": {op: {"config": config}}} if config else None,
        raise_on_error=False,
    )


def _meta(result, key: str, partition: str | None = None) -> dict:
    events = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == key and (partition is None or e.partition == partition)
    ]
    return {k: getattr(v, "value", v) for k, v in events[-1].materialization.metadata.items()}


# -- the watchlist file -----------------------------------------------------------


def test_watchlist_file_normalizes_domains(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(WATCHLIST + "  rfa-news: [Bücher.Example., rfa.org]\n", encoding="utf-8")
    assert load_watchlists(path) == {
        "bbc": ("bbc.com", "bbc.co.uk"),
        "dw": ("dw.com",),
        "quiet": ("nowhere.example",),
        "rfa-news": ("xn--bcher-kva.example", "rfa.org"),
    }


def test_a_consumer_is_a_list_or_a_mapping_with_its_webhook_variable(tmp_path: Path) -> None:
    """The list form of earlier files still loads; the mapping form adds webhook_env."""
    path = tmp_path / "w.yaml"
    path.write_text(
        WATCHLIST
        + "  rsf:\n    domains: [Bücher.de, rsf.org]\n    webhook_env: RSF_WEBHOOK_URL\n"
        + "  cpj:\n    domains: [cpj.org]\n",
        encoding="utf-8",
    )
    assert load_consumers(path) == {
        "bbc": Consumer(("bbc.com", "bbc.co.uk")),
        "dw": Consumer(("dw.com",)),
        "quiet": Consumer(("nowhere.example",)),
        "rsf": Consumer(("xn--bcher-kva.de", "rsf.org"), "RSF_WEBHOOK_URL"),
        "cpj": Consumer(("cpj.org",)),
    }
    assert load_watchlists(path)["rsf"] == ("xn--bcher-kva.de", "rsf.org")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("consumers:\n  bbc: [bbc.com]\nconsumer:\n  dw: [dw.com]\n", 3, "unknown key 'consumer'"),
        ("consumers:\n  bbc: [bbc.com]\n  dw: [dw.com]\n  bbc: [x.org]\n", 4, "duplicate consumer"),
        ("consumers:\n  bbc:\n    - bbc.com\n    - 'bad domain'\n", 4, "is not a domain name"),
        ("consumers:\n  bbc: [com]\n", 2, "'com' is not a domain name"),
        ("consumers:\n  bbc: [bbc.com, BBC.COM]\n", 2, "duplicate domain 'bbc.com'"),
        ("consumers:\n  ../etc: [bbc.com]\n", 2, "is not a safe path segment"),
        ("consumers:\n  BBC: [bbc.com]\n", 2, "is not a safe path segment"),
        ("consumers:\n  bbc: []\n", 2, "expected a non-empty list"),
        ("consumers: [bbc.com]\n", 1, "must map each consumer"),
        ("consumers:\n  bbc: [bbc.com\n", 3, "not valid YAML"),
        # The mapping form: its keys, its domains and its webhook variable.
        ("consumers:\n  bbc:\n    domain: [bbc.com]\n", 3, "unknown key 'domain'"),
        ("consumers:\n  bbc:\n    webhook_env: BBC_URL\n", 3, "'domains' is missing"),
        ("consumers:\n  bbc:\n    domains: ['<b>x']\n", 3, "'<b>x' is not a domain name"),
        (
            "consumers:\n  bbc:\n    domains: [bbc.com]\n    webhook_env: https://hooks.x/T0\n",
            4,
            "is not the name of an environment variable",
        ),
        (
            "consumers:\n  bbc:\n    domains: [bbc.com]\n    webhook_env: bbc_url\n",
            4,
            "is not the name of an environment variable",
        ),
        (
            "consumers:\n  bbc:\n    domains: [bbc.com]\n    webhook_env: [A]\n",
            4,
            "a non-scalar is not the name",
        ),
        (
            "consumers:\n  bbc:\n    domains: [bbc.com]\n\n    webhook_env: OONI_CLICKHOUSE_URL\n",
            5,
            "one of the project's own variables",
        ),
        (
            "consumers:\n  bbc:\n    domains: [bbc.com]\n    webhook_env: AWS_SECRET_ACCESS_KEY\n",
            4,
            "one of the project's own variables",
        ),
        (
            "consumers:\n  bbc:\n    domains: [bbc.com]\n    domains: [dw.com]\n",
            4,
            "duplicate key 'domains'",
        ),
    ],
)
def test_a_wrong_watchlist_file_fails_the_load_with_file_and_line(
    tmp_path: Path, monkeypatch, text: str, line: int, message: str
) -> None:
    path = tmp_path / "watchlists.yaml"
    path.write_text(text)
    with pytest.raises(WatchlistError) as raised:
        load_watchlists(path)
    assert str(raised.value).startswith(f"{path}:{line}: ")
    assert message in str(raised.value)
    # The code location does not load: nothing runs, nothing published changes.
    monkeypatch.setenv("OONI_WATCHLISTS", str(path))
    with pytest.raises(WatchlistError):
        watchlists.watchlists_from_env()


def test_a_long_hostile_name_is_quoted_short(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("consumers:\n  '" + "\u202e" + "x" * 500 + "': [bbc.com]\n")
    message = str(pytest.raises(WatchlistError, load_watchlists, path).value)
    assert "\u202e" not in message and "\\u202e" in message and len(message) < 300


def test_each_consumer_is_an_asset_loaded_from_the_env_var(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(WATCHLIST)
    monkeypatch.setenv("OONI_WATCHLISTS", str(path))
    asset, checks = build_daily_consumer_exports(watchlists.watchlists_from_env())
    assert {k.to_user_string() for k in asset.keys} == {
        "website_metrics_daily",
        "website_metrics_parquet",
        "watchlists/bbc",
        "watchlists/dw",
        "watchlists/quiet",
    }
    assert len(checks) == 5
    assert asset.can_subset
    assert asset.specs_by_key[watchlists.asset_key("bbc")].metadata["domains"].value == [
        "bbc.com",
        "bbc.co.uk",
    ]
    monkeypatch.delenv("OONI_WATCHLISTS")
    assert watchlists.watchlists_from_env() == {}


# -- watchlists -------------------------------------------------------------------

WATCHED = [
    ("w1", f"{DAY} 10:00:00", {"domain": "bbc.com", "input": "https://bbc.com/"}),
    ("w2", f"{DAY} 10:00:01", {"domain": "news.BBC.com", "anomaly": "t", "blocking_type": "dns"}),
    ("w3", f"{DAY} 10:00:02", {"domain": "notbbc.com"}),
    ("w4", f"{DAY} 10:00:03", {"domain": "www.bbc.co.uk", "probe_cc": "RU", "probe_asn": 12389}),
    ("w5", f"{DAY} 10:00:04", {"domain": "dw.com", "msm_failure": "t"}),
    ("w6", f"{DAY} 10:00:05", {"domain": "bbc.com.evil.org"}),
    ("w7", "2024-03-11 00:00:00", {"domain": "bbc.com"}),  # the next day
]


@pytest.fixture
def watched_rows(ch, day_rows) -> None:
    _insert(ch, [_msm(uid, start, **fields) for uid, start, fields in WATCHED])
    # A newer version of w5 that moved it to dw's subdomain: the latest version wins.
    _insert(ch, [_msm("w5", f"{DAY} 10:00:04", domain="www.dw.com", msm_failure="t")])


def _matches(domain: str, watched: tuple[str, ...]) -> bool:
    domain = domain.lower()
    return any(domain == d or domain.endswith("." + d) for d in watched)


def _export_day_then(keys, clickhouse, store_resource, lists):
    """``website_metrics`` of DAY, then the assets ``keys`` of DAY with ``lists``."""
    resources = {"clickhouse": clickhouse, "object_store": store_resource}
    assert dg.materialize([website_metrics], resources=resources, partition_key=DAY).success
    result = _run(keys, clickhouse, store_resource, DAY, lists=lists)
    assert result.success, failure_text(result)
    return store_resource.get_store(), result


def test_watchlists_are_website_metrics_rows_of_each_consumers_domains(
    clickhouse, object_store_resource, watched_rows
) -> None:
    # bbc lists a domain and one of its subdomains: w2 is still one row.
    consumers = {
        "bbc": ("bbc.com", "bbc.co.uk", "news.bbc.com"),
        "dw": ("dw.com",),
        "quiet": ("nowhere.example",),
    }
    keys = [watchlists.asset_key(c) for c in consumers]
    store, result = _export_day_then(keys, clickhouse, object_store_resource, consumers)
    published = _csv(store, wm_key(DAY))

    uids = {}
    for consumer, domains in consumers.items():
        rows = _csv(store, watchlists.object_key(consumer, DAY))
        # Exactly the website_metrics rows (columns, order, values) of its domains.
        assert rows == [r for r in published if _matches(r["domain"], domains)]
        uids[consumer] = [r["explorer_url"].rsplit("/", 1)[1] for r in rows]
        meta = _meta(result, f"watchlists/{consumer}", DAY)
        assert meta["dagster/row_count"] == len(rows)
        assert meta["key"] == watchlists.object_key(consumer, DAY)
        assert (
            meta["sha256"]
            == hashlib.sha256(store.read_bytes(watchlists.object_key(consumer, DAY))).hexdigest()
        )
    assert uids == {"bbc": ["w1", "w2", "w4"], "dw": ["w5"], "quiet": []}
    assert _csv(store, watchlists.object_key("bbc", DAY))[1]["dns"] == "1"
    assert _csv(store, watchlists.object_key("dw", DAY))[0]["failure"] == "1"
    # No rows: a header-only object.
    quiet = gzip.decompress(store.read_bytes(watchlists.object_key("quiet", DAY))).decode()
    assert quiet == ",".join(CSV_COLUMNS) + "\n"
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 3 and all(e.passed for e in evaluations)


# How probes spell hosts in fastpath.domain (the URL's netloc, as sent), each with the
# watched domain it must match, or None.
SPELLINGS = [
    ("www.bücher.de", "bücher.de"),
    ("WWW.BÜCHER.DE", "bücher.de"),
    ("XN--BCHER-KVA.DE", "bücher.de"),
    ("shop.xn--bcher-kva.de", "bücher.de"),
    ("www.bbc.com:443", "bbc.com"),
    ("bbc.com.", "bbc.com"),
    ("user@bbc.com", "bbc.com"),
    ("user:pw@News.BBC.com.:8080", "bbc.com"),
    ("notbbc.com", None),
    ("bbc.com.evil.net", None),
    ("bbc.com.evil.net:443", None),
    ("bbc.com@evil.net", None),
    ("bücher.de.evil.net", None),
    ("xbücher.de", None),
    # UTS #46's mapping: compatibility forms, other full stops, NFD, spaces
    ("ｗｗｗ．ＢＢＣ．ｃｏｍ", "bbc.com"),
    ("news。bbc。com", "bbc.com"),
    ("ｂｂｃ｡com:443", "bbc.com"),
    ("bu\u0308cher.de", "bücher.de"),
    (" bbc.com ", "bbc.com"),
    ("bbc.com。evil.net", None),
    ("ｎｏｔｂｂｃ.com", None),
    ("evil.net＠bbc.com", None),  # a fullwidth @ separates no userinfo
    ("bbc.com\u200b", "bbc.com"),  # characters UTS #46 ignores
    ("bb\u00adc.com", "bbc.com"),
    # labels spelled in IDNA and Unicode in one host
    ("bücher.xn--p1ai", "bücher.рф"),
    ("www.xn--bcher-kva.рф", "bücher.рф"),
    ("bücher.рф.evil.net", None),
    # IDNA 2008, non-transitional: ß is its own letter
    ("STRASSE.straße.de", "straße.de"),
    ("xn--strae-oqa.de", "straße.de"),
    ("strasse.de", None),
]


def test_watchlists_match_every_spelling_of_a_host_and_keep_the_stored_domain(
    clickhouse, object_store_resource, ch, day_rows
) -> None:
    """Unicode case, IDNA or Unicode form, a port, trailing dots and userinfo: the
    host matches; a look-alike does not. The exported ``domain`` stays as stored."""
    _insert(
        ch,
        [
            _msm(f"s{i}", f"{DAY} 11:00:{i:02d}", domain=spelling)
            for i, (spelling, _) in enumerate(SPELLINGS)
        ],
    )
    # A host that is not UTF-8 matches nothing and stops nothing.
    ch.command(
        "INSERT INTO fastpath (measurement_uid, report_id, input, domain, probe_cc, probe_asn, "
        "test_name, measurement_start_time, test_start_time, anomaly, confirmed, msm_failure, "
        "blocking_type) SELECT 's-bad', 'r', 'https://x/', unhex('6262ff632e636f6d'), 'IT', 1, "
        f"'web_connectivity', toDateTime('{DAY} 11:59:00', 'UTC'), "
        f"toDateTime('{DAY} 11:59:00', 'UTC'), 'f', 'f', 'f', ''"
    )
    consumers = {
        "bbc": ("bbc.com",),
        "buecher": ("bücher.de",),
        "rf": ("bücher.рф",),
        "strasse": ("straße.de",),
    }
    lists = {c: tuple(map(normalize_domain, ds)) for c, ds in consumers.items()}
    keys = [watchlists.asset_key(c) for c in consumers]
    store, _ = _export_day_then(keys, clickhouse, object_store_resource, lists)
    for consumer, (watched,) in consumers.items():
        rows = _csv(store, watchlists.object_key(consumer, DAY))
        got = sorted(
            r["domain"] for r in rows if r["explorer_url"].rsplit("/", 1)[1].startswith("s")
        )
        assert got == sorted(s for s, match in SPELLINGS if match == watched), consumer


HOSTILE_INPUTS = ['=HYPERLINK("http://evil.example/","x")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "'="]


def test_probe_text_starting_a_formula_is_written_as_text_in_csvs_and_as_is_in_parquet(
    clickhouse, object_store_resource, ch, day_rows
) -> None:
    """OWASP's "CSV Injection": a probe-supplied cell starting with = + - @ or a tab
    gets a leading apostrophe in every CSV (website_metrics, watchlists, the daily and
    monthly aggregates), so a spreadsheet shows it as text, and so does one starting
    with an apostrophe, so that removing one leading apostrophe gives back every
    value; ordinary values, and the Parquet exports, are as stored."""
    _insert(
        ch,
        [
            _msm(f"h{i}", f"{DAY} 12:00:{i:02d}", input=value, domain="bbc.com", probe_cc=cc)
            for i, (value, cc) in enumerate(
                zip(HOSTILE_INPUTS, ["-1", "=A", "@", "IT", "+X", "'Q"], strict=True)
            )
        ],
    )
    keys = [watchlists.asset_key("bbc"), PARQUET, DAILY]
    store, _ = _export_day_then(keys, clickhouse, object_store_resource, {"bbc": ("bbc.com",)})
    result = _run([MONTHLY], clickhouse, object_store_resource, DAY[:7])
    assert result.success, failure_text(result)

    def hostile(rows):
        return {
            r["explorer_url"].rsplit("/", 1)[1]: r["input"]
            for r in rows
            if r["explorer_url"].rsplit("/", 1)[1].startswith("h")
        }

    expected = {f"h{i}": "'" + value for i, value in enumerate(HOSTILE_INPUTS)}
    published = _csv(store, wm_key(DAY))
    assert hostile(published) == expected
    assert hostile(_csv(store, watchlists.object_key("bbc", DAY))) == expected
    assert all(r["input"][:1] not in "=+-@\t" for r in published if r["input"])
    ordinary = [r["input"] for r in published if r["input"].startswith("http")]
    assert ordinary and all("'" not in r[:1] for r in ordinary)
    # The aggregates: every text cell safe, and one apostrophe off gives the stored value.
    for key in (aggregates.daily_key(DAY), aggregates.monthly_key(DAY[:7])):
        rows = _csv(store, key)
        cells = [r[c] for r in rows for c in ("input", "probe_cc")]
        assert cells and all(cell[:1] not in "=+-@\t" for cell in cells), key
        as_stored = {r["input"][1:] if r["input"][:1] == "'" else r["input"] for r in rows}
        assert set(HOSTILE_INPUTS) <= as_stored, key
        assert {r["probe_cc"] for r in rows} >= {"'-1", "'=A", "'@", "'+X", "''Q", "IT"}, key
    table = pq.read_table(io.BytesIO(store.read_bytes(parquet.parquet_key(DAY)))).to_pylist()
    assert {
        r["explorer_url"].rsplit("/", 1)[1]: r["input"]
        for r in table
        if r["explorer_url"].rsplit("/", 1)[1].startswith("h")
    } == {f"h{i}": value for i, value in enumerate(HOSTILE_INPUTS)}
    daily = pq.read_table(io.BytesIO(store.read_bytes(aggregates.daily_parquet_key(DAY))))
    assert set(HOSTILE_INPUTS) <= set(daily.column("input").to_pylist())


def test_adding_a_consumer_and_backfilling_it_leaves_the_others_untouched(
    clickhouse, s3_store_resource, ch, watched_rows
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    store = s3_store_resource.get_store()
    first = {"bbc": ("bbc.com",), "dw": ("dw.com",)}
    # Everything of the day, the two consumers' watchlists included.
    keys = [DAILY, PARQUET, *(watchlists.asset_key(c) for c in first)]
    assert _run(keys, clickhouse, s3_store_resource, DAY, instance, lists=first).success
    before = {c: store.read_bytes(watchlists.object_key(c, DAY)) for c in ("bbc", "dw")}
    manifest_before = load_exports_manifest(store)

    _insert(ch, [_msm("late", f"{DAY} 11:00:00", domain="bbc.com")])  # bbc's day changed
    second = {**first, "rfa": ("bbc.co.uk",)}
    result = _run([watchlists.asset_key("rfa")], clickhouse, s3_store_resource, DAY, instance, lists=second)  # fmt: skip
    assert result.success, failure_text(result)
    assert {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()} == {
        "watchlists/rfa"
    }
    assert [r["explorer_url"][-2:] for r in _csv(store, watchlists.object_key("rfa", DAY))] == [
        "w4"
    ]
    for consumer, data in before.items():
        assert store.read_bytes(watchlists.object_key(consumer, DAY)) == data
    assert store.exists(aggregates.daily_key(DAY))
    after = load_exports_manifest(store)
    for key, entry in manifest_before.items():
        assert after[key] == entry
    assert watchlists.object_key("rfa", DAY) in after


# -- aggregates -------------------------------------------------------------------

AGG_DAY = "2024-05-02"
AGG_ROWS = [
    # uid, start, cc, asn, domain, input, fields
    ("a1", f"{AGG_DAY} 01:00:00", "IR", 197207, "x.org", "https://x.org/", {}),
    (
        "a2",
        f"{AGG_DAY} 02:00:00",
        "IR",
        197207,
        "x.org",
        "https://x.org/",
        {"anomaly": "t", "blocking_type": "dns", "confirmed": "t"},
    ),  # fmt: skip
    ("a3", f"{AGG_DAY} 03:00:00", "IR", 197207, "x.org", "https://x.org/", {"msm_failure": "t"}),
    ("a4", f"{AGG_DAY} 04:00:00", "IR", 44244, "x.org", "https://x.org/", {"anomaly": "t"}),
    (
        "a5",
        f"{AGG_DAY} 05:00:00",
        "IT",
        30722,
        "y.org",
        'https://y.org/a,"b"',
        {"anomaly": "t", "blocking_type": "http-diff"},
    ),  # fmt: skip
    (
        "a6",
        "2024-05-20 05:00:00",
        "IR",
        58224,
        "x.org",
        "https://x.org/",
        {"anomaly": "t", "blocking_type": "tcp_ip"},
    ),  # fmt: skip
    ("a7", "2024-05-20 06:00:00", "IR", 197207, "x.org", "https://x.org/", {}),
    ("a8", "2024-06-01 00:00:00", "IR", 197207, "x.org", "https://x.org/", {}),  # next month
    (
        "a9",
        f"{AGG_DAY} 06:00:00",
        "IR",
        197207,
        "x.org",
        "https://x.org/",
        {"test_name": "dnscheck"},
    ),  # fmt: skip
]


@pytest.fixture
def agg_rows(ch) -> None:
    _insert(
        ch,
        [
            _msm(uid, start, probe_cc=cc, probe_asn=asn, domain=dom, input=inp, **fields)
            for uid, start, cc, asn, dom, inp, fields in AGG_ROWS
        ],
    )
    # A newer version of a1: anomaly now (unmerged duplicate; the latest wins).
    _insert(
        ch,
        [
            _msm("a1", f"{AGG_DAY} 01:00:00", probe_cc="IR", probe_asn=197207, domain="x.org",
                 input="https://x.org/", anomaly="t", blocking_type="tcp_ip"),
        ],
    )  # fmt: skip


def _counts(n, accessible=0, dns=0, tcp_ip=0, diff=0, hfail=0, anomaly=0, failure=0, confirmed=0):
    return {
        "measurement_count": str(n),
        "accessible": str(accessible),
        "dns": str(dns),
        "tcp_ip": str(tcp_ip),
        "http-diff": str(diff),
        "http-failure": str(hfail),
        "anomaly": str(anomaly),
        "failure": str(failure),
        "confirmed": str(confirmed),
    }


DAILY_EXPECTED = [
    {"probe_cc": "IR", "probe_asn": "44244", "domain": "x.org", "input": "https://x.org/",
     **_counts(1, anomaly=1)},
    {"probe_cc": "IR", "probe_asn": "197207", "domain": "x.org", "input": "https://x.org/",
     **_counts(3, dns=1, tcp_ip=1, failure=1, confirmed=1)},
    {"probe_cc": "IT", "probe_asn": "30722", "domain": "y.org", "input": 'https://y.org/a,"b"',
     **_counts(1, diff=1)},
]  # fmt: skip
MONTHLY_EXPECTED = [
    {"probe_cc": "IR", "domain": "x.org", "input": "https://x.org/",
     **_counts(6, accessible=1, dns=1, tcp_ip=2, anomaly=1, failure=1, confirmed=1),
     "networks": "3", "days": "2"},
    {"probe_cc": "IT", "domain": "y.org", "input": 'https://y.org/a,"b"',
     **_counts(1, diff=1), "networks": "1", "days": "1"},
]  # fmt: skip


def _typed(rows: list[dict[str, str]]) -> list[dict]:
    return [{k: v if k in ("probe_cc", "domain", "input") else int(v) for k, v in r.items()} for r in rows]  # fmt: skip


def test_daily_aggregate_counts_per_network(clickhouse, object_store_resource, agg_rows) -> None:
    result = _run([DAILY], clickhouse, object_store_resource, AGG_DAY)
    assert result.success, failure_text(result)
    store = object_store_resource.get_store()
    rows = _csv(store, aggregates.daily_key(AGG_DAY))
    assert rows == DAILY_EXPECTED
    table = pq.read_table(io.BytesIO(store.read_bytes(aggregates.daily_parquet_key(AGG_DAY))))
    assert table.column_names == list(aggregates.DAILY_COLUMNS)
    assert table.schema.field("probe_asn").type == pa.int32()
    assert table.schema.field("measurement_count").type == pa.uint64()
    assert table.schema.field("probe_cc").type == pa.string()
    assert table.to_pylist() == _typed(DAILY_EXPECTED)
    meta = _meta(result, "website_metrics_daily", AGG_DAY)
    assert meta["dagster/row_count"] == 3
    assert [o["rows"] for o in meta["objects"]] == [3, 3]
    assert meta["fastpath_data_version"].startswith("5@")
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.metadata


def test_monthly_rollup_counts_networks_and_days(
    clickhouse, object_store_resource, agg_rows
) -> None:
    result = _run([MONTHLY], clickhouse, object_store_resource, "2024-05")
    assert result.success, failure_text(result)
    store = object_store_resource.get_store()
    assert aggregates.monthly_key("2024-05") == "exports/website_metrics_monthly/2024-05.csv.gz"
    assert _csv(store, aggregates.monthly_key("2024-05")) == MONTHLY_EXPECTED
    table = pq.read_table(io.BytesIO(store.read_bytes(aggregates.monthly_parquet_key("2024-05"))))
    assert table.column_names == list(aggregates.MONTHLY_COLUMNS)
    assert table.to_pylist() == _typed(MONTHLY_EXPECTED)
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.metadata


def test_aggregates_add_up_to_the_per_measurement_csv(
    clickhouse, local_store_resource, day_rows
) -> None:
    resources = {"clickhouse": clickhouse, "object_store": local_store_resource}
    assert dg.materialize([website_metrics], resources=resources, partition_key=DAY).success
    assert _run([DAILY], clickhouse, local_store_resource, DAY).success
    store = local_store_resource.get_store()
    per_measurement = _csv(store, wm_key(DAY))
    daily = _csv(store, aggregates.daily_key(DAY))
    for column in (*CATEGORIES, "confirmed"):
        assert sum(int(r[column]) for r in daily) == sum(int(r[column]) for r in per_measurement)
    assert sum(int(r["measurement_count"]) for r in daily) == len(CASES)


def test_an_empty_day_is_a_header_only_csv_and_a_parquet_with_its_schema(
    clickhouse, object_store_resource, ch
) -> None:
    day = "2016-01-01"
    daily = _run([DAILY], clickhouse, object_store_resource, day)
    per_msm = _run([PARQUET], clickhouse, object_store_resource, day)
    monthly = _run([MONTHLY], clickhouse, object_store_resource, "2016-01")
    assert daily.success and per_msm.success and monthly.success
    store = object_store_resource.get_store()
    text = gzip.decompress(store.read_bytes(aggregates.daily_key(day))).decode()
    assert text == ",".join(aggregates.DAILY_COLUMNS) + "\n"
    text = gzip.decompress(store.read_bytes(aggregates.monthly_key("2016-01"))).decode()
    assert text == ",".join(aggregates.MONTHLY_COLUMNS) + "\n"
    for key, columns in (
        (aggregates.daily_parquet_key(day), aggregates.DAILY_COLUMNS),
        (aggregates.monthly_parquet_key("2016-01"), aggregates.MONTHLY_COLUMNS),
        (parquet.parquet_key(day), CSV_COLUMNS),
    ):
        table = pq.read_table(io.BytesIO(store.read_bytes(key)))
        assert table.num_rows == 0 and table.column_names == list(columns)


# -- Parquet ----------------------------------------------------------------------


def test_parquet_is_the_csv_table_and_a_month_reads_with_one_glob(
    clickhouse, local_store_resource, day_rows
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    for day in ("2024-03-09", DAY):
        result = _run([PARQUET], clickhouse, local_store_resource, day, instance)  # fmt: skip
        assert result.success, failure_text(result)
        assert all(c.passed for c in result.get_asset_check_evaluations())
    store = local_store_resource.get_store()
    assert parquet.parquet_key(DAY) == (
        f"exports/parquet/website_metrics/day={DAY}/website_metrics_{DAY}.parquet"
    )
    table = pq.read_table(io.BytesIO(store.read_bytes(parquet.parquet_key(DAY))))
    assert table.column_names == list(CSV_COLUMNS)
    types = {f.name: f.type for f in table.schema}
    assert types["measurement_start_time"] == pa.string()
    assert types["probe_asn"] == pa.int32()
    assert all(types[c] == pa.uint8() for c in (*CATEGORIES, "confirmed"))
    as_text = [{k: str(v) for k, v in row.items()} for row in table.to_pylist()]
    assert as_text == _expected()

    # One glob for the month, with the Hive partition as a column.
    root = Path(store.root) / "exports" / "parquet" / "website_metrics"
    files = sorted(glob.glob(str(root / "day=2024-03-*" / "*.parquet")))
    month = pads.dataset(files, format="parquet", partitioning="hive", partition_base_dir=str(root))
    rows = month.to_table().to_pylist()
    assert len(rows) == len(CASES) + 1
    assert {r["day"] for r in rows} == {"2024-03-09", DAY}
    assert [r["explorer_url"] for r in rows if r["day"] == "2024-03-09"] == [
        "https://explorer.ooni.org/m/x2"
    ]


# -- manifest, checks, refusals -----------------------------------------------------


def test_manifest_lists_every_object_with_its_source_version(
    clickhouse, s3_store_resource, ch, agg_rows
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    for key in (DAILY, PARQUET):
        assert _run([key], clickhouse, s3_store_resource, AGG_DAY, instance).success
    store = s3_store_resource.get_store()
    manifest = {"objects": load_exports_manifest(store)}
    version = day_versions(ch, [AGG_DAY])[AGG_DAY]
    keys = [
        aggregates.daily_key(AGG_DAY),
        aggregates.daily_parquet_key(AGG_DAY),
        parquet.parquet_key(AGG_DAY),
    ]
    assert sorted(manifest["objects"]) == sorted(keys)
    for key in keys:
        entry = manifest["objects"][key]
        data = store.read_bytes(key)
        assert entry["key"] == key
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["source_version"] == version
        assert datetime.fromisoformat(entry["written_at"]).tzinfo is not None
    assert manifest["objects"][aggregates.daily_key(AGG_DAY)]["rows"] == 3
    assert manifest["objects"][parquet.parquet_key(AGG_DAY)]["rows"] == 5
    assert manifest["objects"][parquet.parquet_key(AGG_DAY)]["asset"] == "website_metrics_parquet"


@pytest.mark.clickhouse_backends("server")
def test_concurrent_writers_lose_no_manifest_entry(
    clickhouse, s3_store_resource, agg_rows, monkeypatch
) -> None:
    """Two exports finishing together (separate Dagster instances, as two hosts, one
    server): the first to record reads exports/manifest.json before the second has
    written its asset's line, and would write it last, losing the second's asset,
    but for the lock on the manifest (``exports_manifest``): both objects end up in it.

    The interleaving is forced: the second writer waits until the first has read the
    index, the first until the second has written the index (each wait gives up
    after a few seconds, which is what happens under the lock)."""
    import ooni_pipeline.exports.manifest as manifest

    first: list[int] = []
    first_read, second_wrote = threading.Event(), threading.Event()
    write, read = manifest.write_document, manifest._read

    def choreographed_write(store, key, body):
        if first and first[0] != threading.get_ident():
            first_read.wait(5)  # only once the first has read the index
        written = write(store, key, body)
        if key == MANIFEST_KEY and first and first[0] != threading.get_ident():
            second_wrote.set()
        return written

    def choreographed_read(store, key):
        document = read(store, key)
        if key == MANIFEST_KEY and not first:
            first.append(threading.get_ident())
            first_read.set()
            second_wrote.wait(5)  # then write the index last
        return document

    # A manifest to update (a first one is built from whatever exists, race or not).
    assert _run([DAILY], clickhouse, s3_store_resource, "2024-05-01").success
    monkeypatch.setattr(manifest, "write_document", choreographed_write)
    monkeypatch.setattr(manifest, "_read", choreographed_read)
    results = {}

    def run(key) -> None:
        results[key] = _run([key], clickhouse, s3_store_resource, AGG_DAY)

    threads = [threading.Thread(target=run, args=(key,)) for key in (DAILY, PARQUET)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.success for r in results.values())
    store = s3_store_resource.get_store()
    objects = load_exports_manifest(store)
    assert set(objects) == {
        aggregates.daily_key(AGG_DAY),
        aggregates.daily_parquet_key(AGG_DAY),
        parquet.parquet_key(AGG_DAY),
        aggregates.daily_key("2024-05-01"),
        aggregates.daily_parquet_key("2024-05-01"),
    }
    for key in (DAILY, PARQUET):  # each level lists the one below as it is
        assert manifest.asset_entries(store, key)[1] == []


def _record(clickhouse, store_resource, entries, traffic: list | None = None) -> bool:
    """``record_exports`` of ``entries`` in a run of its own, as an export's step
    records (the lock in ClickHouse); ``traffic`` gets the S3Traffic of its store."""
    from ooni_pipeline.exports.manifest import record_exports
    from ooni_pipeline_tests.rig import S3Traffic

    @dg.asset
    def manifest_writer(
        context, clickhouse: ClickHouseResource, object_store: ObjectStoreResource
    ) -> None:
        store = object_store.get_store()
        if traffic is not None:
            traffic.append(S3Traffic(store.client))
        with clickhouse.connect() as ch:
            record_exports(context, ch, store, entries)

    resources = {"clickhouse": clickhouse, "object_store": store_resource}
    return dg.materialize([manifest_writer], resources=resources, raise_on_error=False).success


@pytest.mark.clickhouse_backends("embedded")
def test_recording_a_partition_reads_and_writes_only_its_files(
    clickhouse, s3_store_resource
) -> None:
    """After 90 days of every export (9 assets), recording one more day of
    website_metrics reads and writes its month's file, its asset's file and
    exports/manifest.json, once each, and its small pending file (read once, written
    before and after), nothing else (counted as S3 receives them):
    the cost of a partition does not grow with the other assets' history, nor with
    its own beyond its month and its list of months. The day's consumer step (7
    assets) costs the same per asset, plus the index once."""
    from ooni_pipeline.exports.manifest import (
        PENDING_KEY,
        asset_entries,
        asset_index_key,
        shard_key,
    )
    from ooni_pipeline_tests.rig import export_history

    store = s3_store_resource.get_store()
    history = export_history("2024-01-01", 90)
    assert _record(clickhouse, s3_store_resource, history)
    day = export_history("2024-03-31", 1)
    wm = website_metrics.key

    def own_files(assets) -> list[str]:
        files = [MANIFEST_KEY]
        for key in assets:
            files += [asset_index_key(key), shard_key(key, "2024-03")]
        return sorted(files)

    for assets in (
        [wm],
        [DAILY, PARQUET, *(watchlists.asset_key(c) for c in "c1 c2 c3 c4 c5".split())],
    ):
        files = own_files(assets)
        sizes_before = sum(len(store.read_bytes(k)) for k in [*files, PENDING_KEY])
        traffic: list = []
        assert _record(clickhouse, s3_store_resource, {a: day[a] for a in assets}, traffic)
        (seen,) = traffic
        assert sorted(seen.keys("GET")) == sorted([*files, PENDING_KEY]), seen.requests
        assert sorted(seen.keys("PUT")) == sorted([*files, PENDING_KEY, PENDING_KEY])
        assert len(seen.requests) == 2 * len(files) + 3  # no listing, no HEAD
        assert seen.received == sizes_before
        pending = seen.sent - sum(len(store.read_bytes(k)) for k in files)
        assert 0 < pending < 1_000

    everything = load_exports_manifest(store)
    for asset, objects in history.items():
        assert all(everything[k] == e for k, e in objects.items() if k not in day.get(asset, {}))
        assert asset_entries(store, asset)[1] == []  # each level lists the one below as it is
    assert everything[wm_key("2024-03-31")] == day[wm][wm_key("2024-03-31")]


@pytest.mark.clickhouse_backends("embedded")
def test_the_manifest_of_earlier_versions_is_converted_once(
    clickhouse, local_store_resource
) -> None:
    """A bucket written by the single-file layout (exports/manifest.json and each
    asset's part listing every entry): its checks still read it; the first recording
    converts it, and every entry is then found through the tree."""
    from ooni_pipeline.exports.manifest import (
        asset_entries,
        asset_index_key,
        manifest_disagreements,
    )
    from ooni_pipeline.object_store.manifest import write_manifest
    from ooni_pipeline_tests.rig import export_history

    store = local_store_resource.get_store()
    history = export_history("2024-01-20", 20)
    for asset, objects in history.items():
        write_manifest(store, asset_index_key(asset), objects, asset=asset.to_user_string())
    merged = {k: e for objects in history.values() for k, e in objects.items()}
    write_manifest(store, MANIFEST_KEY, merged, written_at="2026-11-30T00:00:00+00:00")
    old_day = {"2024-01-25": {wm_key("2024-01-25"): merged[wm_key("2024-01-25")]["sha256"]}}
    assert manifest_disagreements(store, website_metrics.key, old_day) == []

    day = export_history("2024-02-09", 1)
    assert _record(
        clickhouse, local_store_resource, {website_metrics.key: day[website_metrics.key]}
    )
    assert load_exports_manifest(store) == {**merged, **day[website_metrics.key]}
    assert json.loads(store.read_bytes(MANIFEST_KEY))["version"] == 2
    for asset in history:
        assert asset_entries(store, asset)[1] == []
    assert manifest_disagreements(store, website_metrics.key, old_day) == []
    assert sorted(store.list_keys("exports/manifests/website_metrics/")) == [
        "exports/manifests/website_metrics/2024-01.json",
        "exports/manifests/website_metrics/2024-02.json",
    ]
    # A run of the earlier version finishing meanwhile writes its asset's part whole
    # (then fails, reading the others): the next recording converts that part too.
    ours = {**history[website_metrics.key], **day[website_metrics.key]}
    write_manifest(store, asset_index_key(website_metrics.key), ours, asset="website_metrics")
    later = export_history("2024-02-10", 1)[website_metrics.key]
    assert _record(clickhouse, local_store_resource, {website_metrics.key: later})
    assert load_exports_manifest(store) == {**merged, **day[website_metrics.key], **later}
    assert asset_entries(store, website_metrics.key)[1] == []


@pytest.mark.clickhouse_backends("embedded")
def test_a_manifest_file_left_behind_fails_the_check_until_rewritten(
    clickhouse, moto_endpoint, s3_bucket
) -> None:
    """The store refuses exports/manifest.json after the asset's files were
    rewritten: the index lists the asset's file with its previous sha256, which a
    client would take for unchanged. The check, reading the tree as a client does,
    fails; the next recording of the asset writes the index again."""
    from ooni_pipeline.exports.manifest import manifest_disagreements
    from ooni_pipeline_tests.rig import FaultyProxy, export_history

    direct = ObjectStoreResource(
        bucket=s3_bucket, endpoint_url=moto_endpoint, region_name="us-east-1"
    )
    store = direct.get_store()
    history = export_history("2024-03-01", 3)
    assert _record(clickhouse, direct, history)
    day = export_history("2024-03-04", 1)[website_metrics.key]
    recorded = {"2024-03-04": {k: e["sha256"] for k, e in day.items()}}
    proxy = FaultyProxy(
        moto_endpoint,
        lambda method, path: method == "PUT" and path.endswith("/exports/manifest.json"),
    )
    try:
        failing = ObjectStoreResource(
            bucket=s3_bucket, endpoint_url=proxy.url, region_name="us-east-1"
        )
        assert not _record(clickhouse, failing, {website_metrics.key: day})
    finally:
        proxy.close()
    assert proxy.failed
    problems = manifest_disagreements(store, website_metrics.key, recorded)
    assert len(problems) == 1
    assert problems[0].startswith(
        "exports/manifest.json lists exports/manifests/website_metrics.json with sha256"
    )
    assert _record(clickhouse, direct, {website_metrics.key: day})
    assert manifest_disagreements(store, website_metrics.key, recorded) == []


@pytest.mark.clickhouse_backends("embedded")
def test_a_level_left_behind_is_listed_again_by_the_next_recording_of_any_month(
    clickhouse, moto_endpoint, s3_bucket
) -> None:
    """The store refuses the asset's file after a re-export of 2024-03-31 rewrote its
    month's file: the asset's file lists March's file with its previous sha256, so a
    client would keep the old day and a new one could never complete a sync. The next
    recording is of another month (2024-04-01): it lists March's file again as it is."""
    from ooni_pipeline.exports.manifest import asset_entries, asset_index_key
    from ooni_pipeline_tests.rig import FaultyProxy, export_history

    direct = ObjectStoreResource(
        bucket=s3_bucket, endpoint_url=moto_endpoint, region_name="us-east-1"
    )
    store = direct.get_store()
    wm = website_metrics.key
    assert _record(clickhouse, direct, export_history("2024-03-30", 2))
    again = {k: {**e, "sha256": "0" * 64} for k, e in export_history("2024-03-31", 1)[wm].items()}
    index = asset_index_key(wm)
    proxy = FaultyProxy(
        moto_endpoint, lambda method, path: method == "PUT" and path.endswith("/" + index)
    )
    try:
        failing = ObjectStoreResource(
            bucket=s3_bucket, endpoint_url=proxy.url, region_name="us-east-1"
        )
        assert not _record(clickhouse, failing, {wm: again})
    finally:
        proxy.close()
    assert proxy.failed
    _, problems = asset_entries(store, wm)
    assert problems and problems[0].startswith(f"{index} lists {index[:-5]}/2024-03.json")

    assert _record(clickhouse, direct, {wm: export_history("2024-04-01", 1)[wm]})
    entries, problems = asset_entries(store, wm)
    assert problems == []
    assert all(entries[k]["sha256"] == "0" * 64 for k in again)
    assert wm_key("2024-04-01") in entries


def test_check_fails_on_a_replaced_object(clickhouse, local_store_resource, agg_rows) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run([DAILY], clickhouse, local_store_resource, AGG_DAY, instance).success  # fmt: skip
    store = local_store_resource.get_store()
    lines = gzip.decompress(store.read_bytes(aggregates.daily_key(AGG_DAY))).splitlines(True)
    store.put_bytes(aggregates.daily_key(AGG_DAY), gzip.compress(b"".join(lines[:-1])))
    context = dg.build_asset_check_context(
        resources={"object_store": local_store_resource}, instance=instance
    )
    daily_check = build_daily_consumer_exports({})[1][0]
    checked = daily_check(context)
    assert not checked.passed
    assert "sha256 differs" in checked.metadata["problems"].value


def test_an_emptied_source_never_replaces_published_exports(
    clickhouse, s3_store_resource, ch, agg_rows
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    daily = DAILY
    assert _run([daily], clickhouse, s3_store_resource, AGG_DAY, instance).success
    store = s3_store_resource.get_store()
    published = store.read_bytes(aggregates.daily_key(AGG_DAY))
    ch.command("TRUNCATE TABLE fastpath")
    refused = _run([daily], clickhouse, s3_store_resource, AGG_DAY, instance)
    assert not refused.success
    assert "0 measurements would replace the 5 published" in failure_text(refused)
    assert store.read_bytes(aggregates.daily_key(AGG_DAY)) == published
    fresh = _run([daily], clickhouse, s3_store_resource, AGG_DAY)  # no record: still refused
    assert "an empty source would replace the published object" in failure_text(fresh)
    forced = _run([daily], clickhouse, s3_store_resource, AGG_DAY, instance, {"force": True})
    assert forced.success
    assert _csv(store, aggregates.daily_key(AGG_DAY)) == []


# -- schedules and automation -------------------------------------------------------


def test_schedules_request_yesterday_and_last_month() -> None:
    context = dg.build_schedule_context(scheduled_execution_time=datetime(2024, 3, 1, 1, 15))
    assert consumer_exports_daily_schedule(context).partition_key == "2024-02-29"
    assert website_metrics_monthly_schedule(context).partition_key == "2024-02"
    assert consumer_exports_daily_schedule.cron_schedule == "15 1 * * *"
    assert website_metrics_monthly_schedule.cron_schedule == "0 3 1 * *"


def test_a_changed_day_re_exports_its_day_and_its_month() -> None:
    from dagster._core.definitions.data_version import DATA_VERSION_TAG

    from ooni_pipeline.clickhouse import ClickHouseResource
    from ooni_pipeline.fastpath.assets import build_fastpath_asset
    from ooni_pipeline.object_store import ObjectStoreResource

    daily, _ = build_daily_consumer_exports({"bbc": ("bbc.com",)})
    defs = dg.Definitions(
        assets=[
            build_fastpath_asset("external"),
            daily,
            aggregates.website_metrics_monthly,
        ],
        resources={"clickhouse": ClickHouseResource(), "object_store": ObjectStoreResource()},
    )
    instance = dg.DagsterInstance.ephemeral()
    # a late upload to a day of last month (a month is a partition once it has ended)
    t0 = datetime(2024, 4, 11, 2, tzinfo=timezone.utc)

    def evaluate(cursor, at: datetime):
        return dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=cursor, evaluation_time=at
        )

    start = evaluate(None, t0)
    assert start.total_requested == 0
    instance.report_runless_asset_event(
        dg.AssetObservation("fastpath", partition="2024-03-10", tags={DATA_VERSION_TAG: "9@x"})
    )
    waiting = evaluate(start.cursor, t0 + timedelta(hours=2))  # 04:00, before the tick
    assert waiting.total_requested == 0
    changed = evaluate(waiting.cursor, t0 + timedelta(hours=3))  # 05:00
    for key in ("website_metrics_daily", "website_metrics_parquet", "watchlists/bbc"):
        assert changed.get_requested_partitions(dg.AssetKey.from_user_string(key)) == {"2024-03-10"}
    # The month follows its day's export, not fastpath's version.
    assert changed.get_requested_partitions(aggregates.MONTHLY_KEY) == set()
    keys = ["website_metrics_daily", "website_metrics_parquet", "watchlists/bbc"]
    materialized_by_a_run(instance, keys, "2024-03-10")
    month = evaluate(changed.cursor, t0 + timedelta(hours=3, minutes=1))
    assert month.get_requested_partitions(aggregates.MONTHLY_KEY) == {"2024-03"}
    again = evaluate(month.cursor, t0 + timedelta(hours=20))
    assert again.total_requested == 0


def _readme_sync(base: str, mine: Path, assets: set[str]):
    """The consumer guide's sync client ("Only what changed" in docs/consumers.md), as
    printed there, pointed at ``base`` and ``mine``, following every object of
    ``assets``."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "consumers.md").read_text()
    section = guide[guide.index("**Only what changed**") :]
    code = section[section.index("```python\n") + 10 : section.index("```\n\n")]
    assert code.count("BASE = ") == code.count("MINE = ") == code.count("ASSETS = ") == 1
    code = code.replace('f"https://{BUCKET}.s3.amazonaws.com/"', repr(base))
    code = code.replace('pathlib.Path("ooni")', f"pathlib.Path({str(mine)!r})")
    code = code.replace('{"website_metrics_parquet"}', repr(assets))
    code = code.replace('"exports/parquet/website_metrics/day=2024-03-"', '""')
    scope: dict = {}
    exec(compile(code, "docs/consumers.md", "exec"), scope)  # its last line is a first sync
    return scope["sync"]


def test_the_manifest_tells_a_sync_client_what_changed(
    clickhouse, s3_store_resource, moto_endpoint, s3_bucket, ch, day_rows, tmp_path
) -> None:
    """The guide's client keeps its copy and follows only the lines whose sha256 changed:
    after a late upload to one day, it downloads the index, the two assets' files and
    their month's files, and that day's objects only, and its copy is the bucket's."""
    from ooni_pipeline_tests.rig import FaultyProxy

    instance = dg.DagsterInstance.ephemeral()
    resources = {"clickhouse": clickhouse, "object_store": s3_store_resource}
    days = ("2024-03-09", DAY)
    store = s3_store_resource.get_store()

    def export_all() -> None:
        for day in days:
            assert dg.materialize(
                [website_metrics], resources=resources, partition_key=day, instance=instance
            ).success
            assert _run([DAILY], clickhouse, s3_store_resource, day, instance).success

    export_all()
    public_read = {  # as OONI's bucket: every export readable without credentials
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{s3_bucket}/exports/*",
            }
        ],
    }
    store.client.put_bucket_policy(Bucket=s3_bucket, Policy=json.dumps(public_read))
    fetched: list[str] = []
    prefix = f"/{s3_bucket}/"
    proxy = FaultyProxy(  # fails nothing: the client's requests, as S3 receives them
        moto_endpoint, lambda method, path: fetched.append(path.removeprefix(prefix)) and False
    )
    mine = tmp_path / "mine"
    try:
        sync = _readme_sync(
            f"{proxy.url}{prefix}", mine, {"website_metrics", "website_metrics_daily"}
        )
        objects = [wm_key(d) for d in days] + [aggregates.daily_key(d) for d in days]
        objects += [aggregates.daily_parquet_key(d) for d in days]
        assert set(objects) < set(fetched)
        synced = load_exports_manifest(store)
        assert sorted(synced) == sorted(objects)
        assert synced[wm_key(DAY)]["rows"] == len(CASES)
        assert (mine / wm_key(DAY)).read_bytes() == store.read_bytes(wm_key(DAY))

        _insert(ch, [_msm("late", f"{DAY} 12:30:00")])
        export_all()
        fetched.clear()
        assert sync("exports/manifest.json")
    finally:
        proxy.close()
    month = "2024-03"
    assert sorted(fetched) == sorted(
        [
            "exports/manifest.json",
            "exports/manifests/website_metrics.json",
            f"exports/manifests/website_metrics/{month}.json",
            "exports/manifests/website_metrics_daily.json",
            f"exports/manifests/website_metrics_daily/{month}.json",
            wm_key(DAY),
            aggregates.daily_key(DAY),
            aggregates.daily_parquet_key(DAY),
        ]
    )
    for key in store.list_keys("exports/"):
        assert (mine / key).read_bytes() == store.read_bytes(key), key
    now = load_exports_manifest(store)
    assert now[wm_key(DAY)]["rows"] == len(CASES) + 1
    assert now[wm_key(DAY)]["source_version"] == day_versions(ch, [DAY])[DAY]


def test_the_stage_table_never_outlives_its_step(
    clickhouse, ch, moto_endpoint, local_store_resource, agg_rows
) -> None:
    def stages() -> list:
        return ch.query_rows(
            "SELECT name FROM system.tables WHERE database = currentDatabase() "
            "AND startsWith(name, '_exports_stage_')"
        )

    assert _run([DAILY, PARQUET], clickhouse, local_store_resource, AGG_DAY).success
    assert stages() == []
    # The uploads fail (no such bucket) after the day is staged: dropped all the same.
    missing = ObjectStoreResource(
        bucket="no-such-bucket", endpoint_url=moto_endpoint, region_name="us-east-1"
    )
    failed = _run([DAILY], clickhouse, missing, AGG_DAY)
    assert not failed.success
    assert "NoSuchBucket" in failure_text(failed)
    assert stages() == []


def _fill_day(ch, day: str, rows: int, salt: str) -> None:
    """``rows`` measurements of ``day``, each its own input: megabytes of exports."""
    ch.command(
        """
        INSERT INTO fastpath (measurement_uid, report_id, input, domain, probe_cc, probe_asn,
            test_name, measurement_start_time, anomaly, confirmed, msm_failure, blocking_type, scores)
        SELECT concat({salt:String}, toString(number)), 'r',
            concat('https://w', toString(number % 50), '.bbc.com/', hex(cityHash64(number, {salt:String}))),
            concat('w', toString(number % 50), '.bbc.com'), 'IT', 3269 + number % 7, 'web_connectivity',
            toDateTime({day:String}, 'UTC') + toIntervalSecond(number % 86400),
            if(number % 3 = 0, 't', 'f'), 'f', 'f', if(number % 3 = 0, 'dns', ''), '{}'
        FROM numbers({rows:UInt64})
        """,
        {"day": f"{day} 00:00:00", "rows": rows, "salt": salt},
    )


# The query of each object a server streams, as its ORDER BY names it, and its asset.
SERVER_STREAMS = {
    "daily aggregate (CSV and Parquet)": ("ORDER BY probe_cc, probe_asn, domain, input", DAILY),
    "website_metrics_parquet": ("ORDER BY measurement_start_time, explorer_url", PARQUET),
    "watchlist": (f"ORDER BY {watchlists.ROW_ORDER}", watchlists.asset_key("bbc")),
    "website_metrics": ("ORDER BY start_time, explorer_url", website_metrics.key),
}


@pytest.mark.clickhouse_backends("server")
def test_an_old_servers_stream_failing_midway_is_never_published(
    clickhouse, clickhouse_server, ch, local_store_resource
) -> None:
    """A server before 25.11 ends a result failing mid-way with status 200 and its
    message as data (ClickHouse#9579): every object streamed from it is checked
    against a count made apart before it replaces the published one, so each
    export fails and every object, its record and the manifest stay as they were."""
    ensure = ch.command
    ensure("TRUNCATE TABLE IF EXISTS fastpath")
    from ooni_pipeline.clickhouse.schema import ensure_tables

    ensure_tables(ch, "fastpath")
    _fill_day(ch, DAY, 60_000, "a")
    lists = {"bbc": ("bbc.com",)}
    keys = [DAILY, PARQUET, watchlists.asset_key("bbc")]
    instance = dg.DagsterInstance.ephemeral()
    resources = {"clickhouse": clickhouse, "object_store": local_store_resource}
    assert dg.materialize(
        [website_metrics], resources=resources, partition_key=DAY, instance=instance
    ).success
    assert _run(keys, clickhouse, local_store_resource, DAY, instance, lists=lists).success
    store = local_store_resource.get_store()
    published = {k: store.read_bytes(k) for k in store.list_keys("exports/")}
    assert len(published) == 14  # 5 objects, the manifest, 4 asset indexes and 4 shards
    _fill_day(ch, DAY, 1_000, "b")  # the day changed: every object would change

    for what, (pattern, key) in SERVER_STREAMS.items():
        with clickhouse_server.old_server(), clickhouse_server.failing_results(pattern, 2 << 20):
            if key == website_metrics.key:
                result = dg.materialize(
                    [website_metrics], resources=resources, partition_key=DAY,
                    instance=instance, raise_on_error=False,
                )  # fmt: skip
            else:
                result = _run([key], clickhouse, local_store_resource, DAY, instance, lists=lists)
        assert not result.success, what
        assert (
            "not published" in failure_text(result)
            or "is not the object" in failure_text(result)
            or "not a CSV" in failure_text(result)
        ), (what, failure_text(result))
        assert {k: store.read_bytes(k) for k in store.list_keys("exports/")} == published, what
    # The same server, healthy again: everything is written.
    assert _run(keys, clickhouse, local_store_resource, DAY, instance, lists=lists).success
    assert store.read_bytes(aggregates.daily_key(DAY)) != published[aggregates.daily_key(DAY)]


def _run_refusing(key, keys, clickhouse, moto_endpoint, s3_bucket, instance):
    """A run of ``keys`` of AGG_DAY whose store (S3 through a proxy) refuses the upload
    of the object ``key``; it must fail."""
    from ooni_pipeline_tests.rig import FaultyProxy

    name = key.rsplit("/", 1)[1]
    proxy = FaultyProxy(
        moto_endpoint, lambda method, path: method in ("PUT", "POST") and name in path
    )
    try:
        failing = ObjectStoreResource(
            bucket=s3_bucket, endpoint_url=proxy.url, region_name="us-east-1"
        )
        result = _run(keys, clickhouse, failing, AGG_DAY, instance)
    finally:
        proxy.close()
    assert not result.success and proxy.failed
    return result


def test_a_day_failing_after_some_of_its_objects_records_them_and_fails_its_check(
    clickhouse, ch, moto_endpoint, s3_bucket, agg_rows
) -> None:
    """The daily aggregate's CSV goes up and the store refuses its Parquet file: the
    CSV, its Dagster record and its manifest entry agree, the Parquet file, its
    record and entry stay the previous ones, and the record is marked incomplete, so
    the check fails until a run writes both."""
    from ooni_pipeline.object_store.stores import object_digest

    direct = ObjectStoreResource(
        bucket=s3_bucket, endpoint_url=moto_endpoint, region_name="us-east-1"
    )
    store = direct.get_store()
    instance = dg.DagsterInstance.ephemeral()
    assert _run([DAILY], clickhouse, direct, AGG_DAY, instance).success
    parquet_before = store.read_bytes(aggregates.daily_parquet_key(AGG_DAY))
    _insert(ch, [_msm("late", f"{AGG_DAY} 23:00:00", domain="x.org", input="https://x.org/late")])
    _run_refusing(
        aggregates.daily_parquet_key(AGG_DAY),
        [DAILY],
        clickhouse,
        moto_endpoint,
        s3_bucket,
        instance,
    )
    record = (
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=DAILY, asset_partitions=[AGG_DAY]), limit=1
        )
        .records[0]
        .asset_materialization.metadata
    )
    assert record["incomplete"].value is True
    by_key = {e["key"]: e for e in record["objects"].value}
    manifest = load_exports_manifest(store)
    for key in (aggregates.daily_key(AGG_DAY), aggregates.daily_parquet_key(AGG_DAY)):
        size = by_key[key]["bytes"]
        assert object_digest(store, key, size) == (by_key[key]["sha256"], size)
        assert manifest[key]["sha256"] == by_key[key]["sha256"]
    assert store.read_bytes(aggregates.daily_parquet_key(AGG_DAY)) == parquet_before
    assert "https://x.org/late" in {r["input"] for r in _csv(store, aggregates.daily_key(AGG_DAY))}

    check = build_daily_consumer_exports({})[1][0]
    context = dg.build_asset_check_context(resources={"object_store": direct}, instance=instance)
    checked = check(context)
    assert not checked.passed
    assert "failed after publishing only some of its objects" in checked.metadata["problems"].value
    assert _run([DAILY], clickhouse, direct, AGG_DAY, instance).success
    assert check(context).passed


def test_an_asset_finished_before_another_failed_is_recorded_whole(
    clickhouse, ch, moto_endpoint, s3_bucket, agg_rows
) -> None:
    """The daily aggregate finished, then website_metrics_parquet's object is refused
    in the same step (found by review): the aggregate is recorded complete, its check
    passes; the Parquet export published nothing and keeps its previous record."""

    direct = ObjectStoreResource(
        bucket=s3_bucket, endpoint_url=moto_endpoint, region_name="us-east-1"
    )
    instance = dg.DagsterInstance.ephemeral()
    assert _run([DAILY, PARQUET], clickhouse, direct, AGG_DAY, instance).success
    _insert(ch, [_msm("late", f"{AGG_DAY} 23:00:00", domain="x.org", input="https://x.org/late")])
    result = _run_refusing(
        parquet.parquet_key(AGG_DAY),
        [DAILY, PARQUET],
        clickhouse,
        moto_endpoint,
        s3_bucket,
        instance,
    )

    def latest(key) -> dict:
        record = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[AGG_DAY]), limit=1
        ).records[0]
        return {"run": record.run_id, **record.asset_materialization.metadata}

    assert latest(DAILY)["run"] == result.run_id and "incomplete" not in latest(DAILY)
    assert latest(PARQUET)["run"] != result.run_id
    checks = build_daily_consumer_exports({})[1]
    context = dg.build_asset_check_context(resources={"object_store": direct}, instance=instance)
    assert all(check(context).passed for check in checks[:2])


def test_watched_domains_are_idna_2008_and_bound_in_every_spelling() -> None:
    """UTS #46, non-transitional, as browsers resolve names: ß and final sigma are
    letters of their own (IDNA 2003 made straße.de strasse.de); compatibility forms
    map; each internationalised label binds in both forms, every mix, capped."""
    assert normalize_domain("Straße.DE.") == "xn--strae-oqa.de"
    assert normalize_domain("ｂｂｃ．ｃｏｍ") == "bbc.com"
    assert normalize_domain("σίσυφος.gr") == "xn--kxa6ajbbmh.gr"
    assert normalize_domain("bad_label.com") is None and normalize_domain("-x.com") is None
    assert watchlists.spellings("bbc.com") == ["bbc.com"]
    assert sorted(watchlists.spellings(normalize_domain("bücher.рф"))) == sorted(
        ["xn--bcher-kva.xn--p1ai", "bücher.xn--p1ai", "xn--bcher-kva.рф", "bücher.рф"]
    )
    many = normalize_domain("ä.ö.ü.ß.é.de")
    assert len(watchlists.spellings(many)) == 2**5 if watchlists.MAX_MIXED_LABELS >= 5 else 2
    assert watchlists.spellings(many)[0] == many and "ä.ö.ü.ß.é.de" in watchlists.spellings(many)
