"""The test-list updater against a local git repository and real chdb."""

from __future__ import annotations

import threading

import dagster as dg
import pytest

from ooni_pipeline.clickhouse import ClickHouse, ClickHouseResource
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.test_lists.assets import citizenlab, citizenlab_rows_valid_check
from ooni_pipeline.test_lists.definitions import citizenlab_schedule
from ooni_pipeline.test_lists.parse import InvalidURL, url_domain
from ooni_pipeline_tests.rig import GitRepo, failure_text, materialization_metadata

HEADER = "url,category_code,category_description,date_added,source,notes"


def _row(url: str, cat: str = "NEWS") -> str:
    return f'{url},{cat},"News, media",2020-01-01,citizenlab,""'


LISTS = {
    "lists/it.csv": "\n".join(
        [
            HEADER,
            _row("https://www.repubblica.it/"),
            _row("http://example.it:8080/path?q=1"),
            _row("http://1.2.3.4/"),
            _row("https://www.repubblica.it/"),  # duplicate: kept once
            _row("ftp://files.example.it/"),  # bad scheme
            _row("http://bad_host.example/"),  # bad host (underscore)
            _row("http://999.1.1.1/"),  # bad IPv4
            _row("http://example.it:99999/"),  # bad port
            _row('"http://exa\\mple.it/"'),  # backslash
            _row("http://nocat.it/", ""),  # missing category
            "",
        ]
    ),
    # CRLF line endings, a tab inside a URL
    "lists/de.csv": "\r\n".join(
        [HEADER, _row("https://www.spiegel.de/"), _row('"http://tab\tbad.de/"'), ""]
    ),
    # UTF-8 BOM, an internationalised domain in punycode, a scheme-less URL
    "lists/fr.csv": "\ufeff"
    + "\n".join([HEADER, _row("http://xn--caf-dma.fr/"), _row("lemonde.fr"), ""]),
    "lists/global.csv": "\n".join(
        [
            HEADER,
            _row("https://www.torproject.org/", "ANON"),
            _row("https://www.spiegel.de/", "NEWS"),
            "",
        ]
    ),
    # Files that are not country lists are skipped, even with odd content.
    "lists/00-LEGEND-category_codes.csv": "CODE,NAME\nNEWS,News\n",
    "lists/cis.csv": "whatever\n",
    "lists/official/it.csv": "junk\n",
    "README.md": "test lists\n",
}

EXPECTED = {
    ("www.repubblica.it", "https://www.repubblica.it/", "IT", "NEWS"),
    ("example.it", "http://example.it:8080/path?q=1", "IT", "NEWS"),
    ("1.2.3.4", "http://1.2.3.4/", "IT", "NEWS"),
    ("www.spiegel.de", "https://www.spiegel.de/", "DE", "NEWS"),
    ("xn--caf-dma.fr", "http://xn--caf-dma.fr/", "FR", "NEWS"),
    ("lemonde.fr", "lemonde.fr", "FR", "NEWS"),
    ("www.torproject.org", "https://www.torproject.org/", "ZZ", "ANON"),
    ("www.spiegel.de", "https://www.spiegel.de/", "ZZ", "NEWS"),
}

SMALL_BOUNDS = {
    "ops": {"citizenlab": {"config": {"min_rows_exclusive": 1, "max_rows_exclusive": 100}}}
}


def _table(ch: ClickHouse) -> set[tuple[str, str, str, str]]:
    rows = ch.query_rows(
        "SELECT domain, url, replaceAll(toString(cc), '\\0', ''), category_code FROM citizenlab"
    )
    return set(rows)


def _run(clickhouse: ClickHouseResource, instance: dg.DagsterInstance, run_config=SMALL_BOUNDS):
    return dg.materialize(
        [citizenlab, citizenlab_rows_valid_check],
        resources={"clickhouse": clickhouse},
        instance=instance,
        run_config=run_config,
        raise_on_error=False,
    )


@pytest.fixture
def repo(git_repo: GitRepo, monkeypatch: pytest.MonkeyPatch) -> GitRepo:
    git_repo.commit(LISTS, "initial lists")
    monkeypatch.setenv("OONI_TEST_LISTS_REPO", git_repo.url)
    return git_repo


def test_exact_rows_land_and_rejections_are_reported(clickhouse, ch, repo) -> None:
    result = _run(clickhouse, dg.DagsterInstance.ephemeral())
    assert result.success
    assert _table(ch) == EXPECTED
    meta = materialization_metadata(result)
    assert meta["dagster/row_count"] == len(EXPECTED)
    assert meta["commit"] == repo._git("rev-parse", "HEAD")
    assert meta["rejected_by_reason"] == {
        "bad_scheme": 1,
        "bad_host": 2,
        "bad_port": 1,
        "bad_characters": 2,
        "missing_category_code": 1,
    }
    assert meta["duplicates"] == 1
    assert meta["files"] == 4 and meta["countries"] == 4
    assert meta["urls_added"] == len(EXPECTED) and meta["urls_removed"] == 0
    assert "lists/it.csv:6: bad_scheme" in meta["rejected_examples"]
    assert [c.name for c in meta["dagster/column_schema"].columns] == [
        "domain",
        "url",
        "cc",
        "category_code",
    ]
    (check,) = result.get_asset_check_evaluations()
    assert check.passed


def test_unchanged_commit_skips_then_a_new_commit_rewrites(clickhouse, ch, repo) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    again = _run(clickhouse, instance)
    assert materialization_metadata(again)["skipped"] is True
    assert _table(ch) == EXPECTED

    repo.commit({"lists/it.csv": LISTS["lists/it.csv"] + _row("https://www.corriere.it/") + "\n"})
    third = _run(clickhouse, instance)
    meta = materialization_metadata(third)
    assert meta["skipped"] is False and meta["urls_added"] == 1 and meta["urls_removed"] == 0
    assert ("www.corriere.it", "https://www.corriere.it/", "IT", "NEWS") in _table(ch)


def _assert_failed_and_unchanged(result, ch: ClickHouse, message: str) -> None:
    assert not result.success
    text = failure_text(result)
    assert message in text, text
    assert _table(ch) == EXPECTED


def test_clone_failure_leaves_the_table(clickhouse, ch, repo, monkeypatch, tmp_path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    monkeypatch.setenv("OONI_TEST_LISTS_REPO", (tmp_path / "missing").as_uri())
    _assert_failed_and_unchanged(_run(clickhouse, instance), ch, "git clone of file://")


def test_wrong_header_leaves_the_table(clickhouse, ch, repo) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    repo.commit({"lists/es.csv": "url,category\nhttp://elpais.es/,NEWS\n"})
    _assert_failed_and_unchanged(_run(clickhouse, instance), ch, "lists/es.csv: header is")


def test_out_of_bounds_leaves_the_table(clickhouse, ch, repo) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    repo.commit({}, "same lists, new commit")
    # Default bounds: more than 20,000 rows are required.
    _assert_failed_and_unchanged(
        _run(clickhouse, instance, run_config=None), ch, "outside the sanity bounds"
    )


def test_insert_failure_leaves_the_table(clickhouse, ch, repo) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    repo.commit({}, "new commit")
    # Break the staging table so the insert fails.
    ch.command("DROP TABLE citizenlab_flip")
    ch.command(
        "CREATE TABLE citizenlab_flip (domain String, url UInt8) ENGINE = MergeTree ORDER BY domain"
    )
    _assert_failed_and_unchanged(_run(clickhouse, instance), ch, "filling citizenlab_flip failed")


def test_check_fails_on_an_empty_table(clickhouse, ch) -> None:
    ensure_tables(ch, "citizenlab")
    result = citizenlab_rows_valid_check(clickhouse=clickhouse)
    assert not result.passed


@pytest.mark.parametrize(
    ("url", "domain"),
    [
        ("https://www.example.org/a?b=c", "www.example.org"),
        ("HTTP://Example.COM", "Example.COM"),
        ("example.com/path", "example.com"),
        ("http://10.0.0.1:8080", "10.0.0.1"),
        ("https://example.com./", "example.com."),
    ],
)
def test_url_domain_accepts(url: str, domain: str) -> None:
    assert url_domain(url) == domain


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", "empty_url"),
        ("https://example.com/a b", "bad_characters"),
        ("https://example.com/\r", "bad_characters"),
        ("javascript://x.com/", "bad_scheme"),
        ("https://localhost/", "bad_host"),
        ("https://-bad.com/", "bad_host"),
        ("https://user@example.com/", "bad_host"),
        ("https://01.2.3.4/", "bad_host"),
        ("https://example.123/", "bad_host"),
        ("https://example.com:0/", "bad_port"),
        ("https://example.com:http/", "bad_port"),
        ("https://example.com#frag", "bad_path"),
    ],
)
def test_url_domain_rejects(url: str, reason: str) -> None:
    with pytest.raises(InvalidURL) as info:
        url_domain(url)
    assert info.value.reason == reason


def test_schedule() -> None:
    assert citizenlab_schedule.name == "citizenlab_schedule"
    assert citizenlab_schedule.cron_schedule == "*/30 * * * *"
    assert citizenlab_schedule.execution_timezone == "UTC"


def test_two_runs_at_once_take_turns(clickhouse, ch, repo) -> None:
    """A scheduled run starting while another still works (a retry backing off)
    waits for it: both end, the table is whole, the swaps did not interleave."""
    # 40,000 more URLs make each run's locked part (parse, fill, swap) last long
    # enough that the two runs meet there.
    many = "\n".join([HEADER, *(_row(f"https://site{i}.example.us/") for i in range(40_000))])
    repo.commit({"lists/us.csv": many + "\n"}, "a long list")
    config = {"ops": {"citizenlab": {"config": {"max_rows_exclusive": 100_000}}}}
    start = threading.Barrier(2)
    results = {}

    def times(instance, run_id: str, wanted) -> list[float]:
        return [e.timestamp for e in instance.all_logs(run_id) if wanted(e)]

    def waiting(e) -> bool:
        return "lock citizenlab is held by" in (e.user_message or "")

    def materialized(e) -> bool:
        return bool(e.dagster_event) and e.dagster_event.event_type_value == "ASSET_MATERIALIZATION"

    # Two Dagster instances, as two deployments would be (runs of one in-process
    # instance started from two threads deadlock in Dagster's logging set-up): each
    # sees the other's run as unknown, so the lock is honoured, not taken over.
    instances = {"a": dg.DagsterInstance.ephemeral(), "b": dg.DagsterInstance.ephemeral()}

    def run(name: str) -> None:
        start.wait()
        results[name] = _run(clickhouse, instances[name], config)

    threads = [threading.Thread(target=run, args=(n,)) for n in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.success for r in results.values())
    waited = [n for n, r in results.items() if times(instances[n], r.run_id, waiting)]
    assert len(waited) == 1
    (went,) = set(instances) - set(waited)
    (first_swap,) = times(instances[went], results[went].run_id, materialized)
    second = instances[waited[0]], results[waited[0]].run_id
    (second_swap,) = times(*second, materialized)
    assert times(*second, waiting)[0] < first_swap < second_swap
    assert ch.count("citizenlab") == len(EXPECTED) + 40_000
    assert ch.scalar("SELECT count() FROM system.tables WHERE name LIKE '\\_lock%'") == 0


@dg.asset
def _fails() -> None:
    raise RuntimeError("a run that ended without releasing its lock")


def test_a_lock_left_by_an_ended_run_is_taken_over(clickhouse, ch, repo) -> None:
    with dg.instance_for_test() as instance:
        ended = dg.materialize([_fails], instance=instance, raise_on_error=False)
        assert not ended.success
        ch.command(
            "CREATE TABLE _lock_citizenlab (owner String, since DateTime64(3)) ENGINE = Memory"
        )
        ch.command("INSERT INTO _lock_citizenlab SELECT {o:String}, now64(3)", {"o": ended.run_id})
        result = _run(clickhouse, instance)
        assert result.success
        messages = [e.user_message for e in instance.all_logs(result.run_id)]
        assert any(f"its owner {ended.run_id} is gone" in m for m in messages)
    assert _table(ch) == EXPECTED
    assert ch.scalar("SELECT count() FROM system.tables WHERE name LIKE '\\_lock%'") == 0
