"""The test-list updater against a local git repository and real chdb."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from ooni_pipeline.clickhouse import ClickHouse, ClickHouseResource
from ooni_pipeline.clickhouse.schema import ensure_tables
from ooni_pipeline.test_lists import parse as lists_parse
from ooni_pipeline.test_lists.assets import citizenlab, citizenlab_rows_valid_check
from ooni_pipeline.test_lists.definitions import citizenlab_schedule
from ooni_pipeline.test_lists.parse import InvalidURL, country_of, read_lists, url_domain
from ooni_pipeline_tests.rig import (
    GitRepo,
    Reply,
    UpstreamServer,
    failure_text,
    materialization_metadata,
)

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
    # Upstream text, shown as text: never rendered as Markdown.
    raw = result.get_asset_materialization_events()[-1].materialization.metadata
    assert isinstance(raw["rejected_examples"], dg.TextMetadataValue)
    assert 0 < meta["clone_bytes"] < 500_000_000
    assert [c.name for c in meta["dagster/column_schema"].columns][:4] == [
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
    _assert_failed_and_unchanged(_run(clickhouse, instance), ch, "lists/es.csv:1: header is")


def test_out_of_bounds_leaves_the_table(clickhouse, ch, repo) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    repo.commit({}, "same lists, new commit")
    # Default bounds: more than 20,000 rows are required.
    _assert_failed_and_unchanged(
        _run(clickhouse, instance, run_config=None), ch, "outside the sanity bounds"
    )


# Embedded only: behind the test endpoint, chdb's streamed insert (send_insert) drops a
# block violating a constraint without an error (26.9), where a server answers 469.
@pytest.mark.clickhouse_backends("embedded")
def test_insert_failure_leaves_the_table(clickhouse, ch, repo) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    repo.commit({}, "new commit")
    # The operator's constraint refuses a row: the staging twin carries it, the insert fails.
    ch.command("ALTER TABLE citizenlab ADD CONSTRAINT no_lemonde CHECK url != 'lemonde.fr'")
    _assert_failed_and_unchanged(_run(clickhouse, instance), ch, "filling citizenlab_flip failed")


def test_a_staging_table_of_another_shape_is_rebuilt_not_trusted(clickhouse, ch, repo) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    repo.commit({}, "new commit")
    ch.command("DROP TABLE citizenlab_flip")
    ch.command(
        "CREATE TABLE citizenlab_flip (domain String, url UInt8) ENGINE = MergeTree ORDER BY domain"
    )
    live_definition = ch.scalar("SHOW CREATE TABLE citizenlab")
    assert _run(clickhouse, instance).success
    assert _table(ch) == EXPECTED
    assert ch.scalar("SHOW CREATE TABLE citizenlab") == live_definition
    twin = ch.scalar("SHOW CREATE TABLE citizenlab_flip")
    assert twin == live_definition.replace(".citizenlab\n", ".citizenlab_flip\n", 1)


def _run_record(instance: dg.DagsterInstance, result) -> str:
    """Everything the run stored: its event log (logs, failure, metadata) serialized."""
    return "\n".join(dg.serialize_value(entry) for entry in instance.all_logs(result.run_id))


def _secrets_of(target: Path) -> list[str]:
    """Strings of a file outside the checkout that must never reach the run's record."""
    data = target.read_bytes()
    parts = data.split(b"\0") if target == Path("/proc/self/environ") else data.splitlines()
    secrets = [p.decode("utf-8", "replace") for p in parts if len(p) > 12]
    assert secrets
    return secrets


@pytest.mark.parametrize("target", ["/proc/self/environ", "/etc/passwd", "secrets.env"])
def test_a_symlinked_list_fails_unread_and_leaves_the_table(
    clickhouse, ch, repo, tmp_path, target: str
) -> None:
    """A list committed as a symlink to the environment, /etc/passwd or a secrets
    file fails the update, names the file only, and leaves the table as it was.
    (/proc/self/environ holds the environment the process started with, so the
    strings checked are its entries; a variable set in the test would not be there.)"""
    secret_file = Path(target)
    if target == "secrets.env":
        secret_file = tmp_path / target
        secret_file.write_text("AWS_SECRET_ACCESS_KEY=MARKER-8c1f0e2d-secret-value\n")
    secrets = _secrets_of(secret_file)
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    (repo.path / "lists" / "xx.csv").symlink_to(secret_file)
    repo.commit({}, "a hostile symlink")

    result = _run(clickhouse, instance)

    record = _run_record(instance, result)
    leaked = sum(secret in record for secret in secrets)  # not shown: they are secrets
    assert leaked == 0, f"{leaked} strings of {target} reached the run's record"
    _assert_failed_and_unchanged(result, ch, "lists/xx.csv: a symlink in the repository; refused")


def test_symlinks_in_a_checkout_are_refused_unread(tmp_path) -> None:
    """Whatever made the checkout (a clone with symlinks on), a symlinked list file or
    a symlinked lists/ directory is refused, naming the file only."""
    secret = tmp_path / "secrets.env"
    secret.write_text("AWS_SECRET_ACCESS_KEY=MARKER-8c1f0e2d-secret-value\n")
    checkout = tmp_path / "checkout"
    (checkout / "lists").mkdir(parents=True)
    (checkout / "lists" / "it.csv").symlink_to(secret)
    with pytest.raises(lists_parse.TestListFormatError) as info:
        read_lists(checkout)
    assert str(info.value) == "lists/it.csv: not a regular file (a symlink?); refused"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "it.csv").write_text(LISTS["lists/it.csv"])
    other = tmp_path / "other-checkout"
    other.mkdir()
    (other / "lists").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(lists_parse.TestListFormatError, match="lists is not a directory"):
        read_lists(other)


def test_country_files_are_exactly_two_letters() -> None:
    assert country_of(Path("it.csv")) == "IT"
    assert country_of(Path("it\n.csv")) is None


def test_a_bad_header_is_named_with_a_short_escaped_excerpt(clickhouse, ch, repo) -> None:
    marker = "MARKER-5b7e-header-secret"
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    header = "url;category_code;category_description;date_added;\x1b[2J" + marker
    repo.commit({"lists/es.csv": f"{header}\nhttp://elpais.es/,NEWS\n"})

    result = _run(clickhouse, instance)

    _assert_failed_and_unchanged(
        result, ch, "lists/es.csv:1: header is 'url;category_code;category_description;d'..."
    )
    record = _run_record(instance, result)
    assert marker not in record and "\x1b" not in failure_text(result)


def test_a_url_starting_with_a_dash_is_a_url_not_an_option(
    clickhouse, ch, repo, monkeypatch, tmp_path
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("OONI_TEST_LISTS_REPO", f"--upload-pack=touch {pwned}")
    result = _run(clickhouse, instance)
    # git looked for a repository by that name: it was not read as an option.
    _assert_failed_and_unchanged(result, ch, f"repository '--upload-pack=touch {pwned}'")
    assert not pwned.exists()


@pytest.mark.parametrize(
    "content",
    [os.urandom(300_000), b"\0" * 5_000_000],
    ids=["large download", "small download of large files"],
)
def test_a_clone_over_the_size_cap_leaves_the_table(clickhouse, ch, repo, content) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    repo.commit({"data/blob.bin": content}, "a large file")
    config = {**SMALL_BOUNDS["ops"]["citizenlab"]["config"], "clone_max_bytes": 200_000}
    result = _run(clickhouse, instance, run_config={"ops": {"citizenlab": {"config": config}}})
    _assert_failed_and_unchanged(result, ch, "the repository is larger than clone_max_bytes")


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def test_a_clone_timeout_kills_every_git_process(clickhouse, ch, repo, monkeypatch) -> None:
    """A server that stalls: the run fails at the timeout and no git helper
    (git-remote-http) is left running against it."""
    instance = dg.DagsterInstance.ephemeral()
    assert _run(clickhouse, instance).success
    server = UpstreamServer()
    try:
        server.fail("repo.git/info/refs?service=git-upload-pack", Reply(200, b"", delay_s=8))
        url = server.url("repo.git")
        monkeypatch.setenv("OONI_TEST_LISTS_REPO", url)
        config = {**SMALL_BOUNDS["ops"]["citizenlab"]["config"], "clone_timeout_s": 1}
        start = time.monotonic()
        result = _run(clickhouse, instance, run_config={"ops": {"citizenlab": {"config": config}}})
        assert time.monotonic() - start < 6
        _assert_failed_and_unchanged(result, ch, "timed out after 1 s")
        assert _processes_mentioning(url) == []
    finally:
        server.close()


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
    assert (
        ch.scalar(
            "SELECT count() FROM system.tables WHERE database = currentDatabase() "
            "AND name LIKE '\\_lock%'"
        )
        == 0
    )


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
    locks = ch.query_rows(
        "SELECT name FROM system.tables WHERE database = currentDatabase() "
        "AND name LIKE '\\_lock%' ORDER BY name"
    )
    # Released; the taken-over lock stays as a tombstone for a day (lock.py).
    assert locks == [("_lock_dead_citizenlab_",)]


def test_the_operators_table_keeps_its_definition(clickhouse, ch, repo, operator_tables) -> None:
    """OONI's DDL plus an operator's column, setting and comment: every run, forced or
    not, replaces the rows and leaves the definition exactly as it was."""
    before = operator_tables("citizenlab")
    instance = dg.DagsterInstance.ephemeral()
    forced = {
        "ops": {
            "citizenlab": {"config": {**SMALL_BOUNDS["ops"]["citizenlab"]["config"], "force": True}}
        }
    }
    for run_config in (SMALL_BOUNDS, forced, forced):
        assert _run(clickhouse, instance, run_config).success
        assert operator_tables("citizenlab") == before
        assert _table(ch) == EXPECTED
    # The column the project does not know is filled by its default.
    assert ch.query_rows("SELECT DISTINCT added_by FROM citizenlab") == [("operator",)]
