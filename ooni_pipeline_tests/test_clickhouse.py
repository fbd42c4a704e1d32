"""The ClickHouse layer on real ClickHouse: embedded (chdb) and behind its HTTP
interface (the endpoint of conftest.py), every test that uses ``ch`` on both."""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import pandas as pd
import pytest

from ooni_pipeline.clickhouse import (
    ClickHouse,
    ClickHouseError,
    ClickHouseResource,
    quote_identifier,
)
from ooni_pipeline.clickhouse.connection import STREAM_BLOCK, redact_url
from ooni_pipeline.clickhouse.lock import LockTimeoutError, exclusive, this_worker
from ooni_pipeline.clickhouse.schema import (
    KNOWN_TABLES,
    MissingTableError,
    StagingMismatchError,
    create_table_sql,
    ensure_tables,
    plain_engine,
)
from ooni_pipeline.clickhouse.swap import RowBounds, TableUpdateError, replace_table
from ooni_pipeline_tests.clickhouse_http import ClickHouseHTTP
from ooni_pipeline_tests.conftest import SERVER_DATABASE, SERVER_PASSWORD, SERVER_USER

pytestmark = pytest.mark.clickhouse_backends("embedded", "server", "server-24.8")


def test_bound_parameters_carry_hostile_values(ch: ClickHouse) -> None:
    ch.command("CREATE TABLE t (id UInt32, s String) ENGINE = MergeTree ORDER BY id")
    hostile = "x'); DROP TABLE t; --\"\\"
    ch.insert_df("t", pd.DataFrame({"id": [1, 2], "s": [hostile, "plain"]}))
    rows = ch.query_rows("SELECT id FROM t WHERE s = {s:String}", {"s": hostile})
    assert rows == [(1,)]
    assert ch.count("t") == 2


def test_identifiers_are_validated() -> None:
    assert quote_identifier("fastpath") == "`fastpath`"
    for bad in ["", "a b", "t; DROP TABLE x", "`x`", "1abc", "a.b"]:
        with pytest.raises(ValueError, match="invalid ClickHouse identifier"):
            quote_identifier(bad)


def test_stream_yields_the_whole_result_in_chunks(ch: ClickHouse) -> None:
    chunks = list(
        ch.stream("SELECT number, toString(number) FROM numbers({n:UInt64})", {"n": 300_000})
    )
    assert len(chunks) > 1
    lines = b"".join(chunks).splitlines()
    assert len(lines) == 300_000
    assert lines[0] == b'0,"0"' and lines[-1] == b'299999,"299999"'


def test_header_and_columns(ch: ClickHouse) -> None:
    ensure_tables(ch, "asnmeta")
    assert ch.header("SELECT asn, org_name FROM asnmeta") == ["asn", "org_name"]
    assert ch.columns("asnmeta")[0] == ("asn", "UInt32")


def test_ensure_tables_creates_every_known_table_idempotently(ch: ClickHouse) -> None:
    ensure_tables(ch, *KNOWN_TABLES)
    ensure_tables(ch, *KNOWN_TABLES)
    names = {
        row[0]
        for row in ch.query_rows(
            "SELECT name FROM system.tables WHERE database = currentDatabase()"
        )
    }
    assert set(KNOWN_TABLES) <= names
    assert dict(ch.columns("fastpath"))["update_time"] == "DateTime64(3)"
    with pytest.raises(ValueError, match="unknown table"):
        ensure_tables(ch, "nope")


def test_errors_name_the_query(ch: ClickHouse) -> None:
    with pytest.raises(ClickHouseError, match="no_such_table"):
        ch.command("SELECT * FROM no_such_table")


def test_redact_url() -> None:
    assert (
        redact_url("https://ooni:s3cret@ch.example.org:8443/ooni")
        == "https://ooni:***@ch.example.org:8443/ooni"
    )
    assert redact_url("chdb:///var/lib/x") == "chdb:///var/lib/x"


def test_server_connection_error_hides_the_password() -> None:
    with pytest.raises(ClickHouseError) as info:
        ClickHouse("http://ooni:topsecretpw@127.0.0.1:9/default")
    assert "topsecretpw" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def _fill_asnmeta(rows: list[tuple[int, str]]):
    def fill(ch: ClickHouse, table: str) -> None:
        ch.insert_df(
            table,
            pd.DataFrame(
                {
                    "asn": [r[0] for r in rows],
                    "org_name": [r[1] for r in rows],
                    "cc": "IT",
                    "changed": pd.Timestamp("2020-01-01").date(),
                    "aut_name": "",
                    "source": "test",
                }
            ),
        )

    return fill


def test_replace_table_swaps_atomically(ch: ClickHouse) -> None:
    replace_table(ch, live="asnmeta", staging="asnmeta_tmp", fill=_fill_asnmeta([(1, "old")]))
    result = replace_table(
        ch,
        live="asnmeta",
        staging="asnmeta_tmp",
        fill=_fill_asnmeta([(2, "new"), (3, "new")]),
        bounds=RowBounds(1, 10),
    )
    assert (result.rows, result.previous_rows) == (2, 1)
    assert ch.query_rows("SELECT asn FROM asnmeta ORDER BY asn") == [(2,), (3,)]
    # The live table got the staging table's parts (REPLACE PARTITION copies them).
    assert ch.query_rows("SELECT asn FROM asnmeta_tmp ORDER BY asn") == [(2,), (3,)]


@pytest.mark.parametrize("failure", ["fill", "bounds", "validate"])
def test_replace_table_failure_keeps_the_live_table(ch: ClickHouse, failure: str) -> None:
    replace_table(ch, live="asnmeta", staging="asnmeta_tmp", fill=_fill_asnmeta([(1, "old")]))

    def failing_fill(ch: ClickHouse, table: str) -> None:
        _fill_asnmeta([(5, "partial")])(ch, table)  # a partial write, then the failure
        raise RuntimeError("injected failure while inserting")

    def refuse(ch: ClickHouse, table: str) -> None:
        raise ValueError("injected validation failure")

    kwargs = {
        "fill": failing_fill if failure == "fill" else _fill_asnmeta([(7, "x")] * 3),
        "bounds": RowBounds(5, 10) if failure == "bounds" else None,
        "validate": refuse if failure == "validate" else None,
    }
    with pytest.raises(TableUpdateError, match="asnmeta_tmp"):
        replace_table(ch, live="asnmeta", staging="asnmeta_tmp", **kwargs)
    assert ch.query_rows("SELECT asn, org_name FROM asnmeta") == [(1, "old")]


@pytest.mark.clickhouse_backends("embedded")
def test_second_process_waits_for_the_embedded_lock(chdb_path: Path, ch: ClickHouse) -> None:
    """While this process holds the directory, another one waits, then succeeds."""
    ch.command("CREATE TABLE lock_probe (x UInt8) ENGINE = MergeTree ORDER BY x")
    script = textwrap.dedent(
        f"""
        import logging, sys, time
        logging.basicConfig(level=logging.INFO)
        from ooni_pipeline.clickhouse import ClickHouse
        print("ready", flush=True)  # imports done: the next step meets the lock
        start = time.monotonic()
        with ClickHouse("chdb://{chdb_path}", lock_timeout_s=120, lock_poll_s=0.2) as ch:
            ch.command("INSERT INTO lock_probe VALUES (1)")
        print(f"waited {{time.monotonic() - start:.1f}}", flush=True)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "ready"
    time.sleep(2)
    assert child.poll() is None  # still waiting on our lock
    ch.close()
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert "acquired after waiting" in err
    assert float(out.split()[1]) >= 1.5
    with ClickHouse(f"chdb://{chdb_path}") as again:
        assert again.count("lock_probe") == 1


@pytest.mark.clickhouse_backends("embedded")
def test_lock_wait_gives_up_with_a_clear_message(chdb_path: Path, ch: ClickHouse) -> None:
    script = f"""
from ooni_pipeline.clickhouse import ClickHouse
ClickHouse("chdb://{chdb_path}", lock_timeout_s=1, lock_poll_s=0.2)
"""
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert child.returncode != 0
    assert "held by another process" in child.stderr


@pytest.mark.clickhouse_backends("embedded")
def test_a_lock_left_by_a_crashed_process_is_taken_over_at_once(
    chdb_path: Path, ch: ClickHouse
) -> None:
    """A run killed while holding a lock leaves the lock table, whose owner row (a
    Memory table's) dies with it: the next run must not wait out the server's grace."""
    ch.close()
    script = textwrap.dedent(
        f"""
        import os
        from ooni_pipeline.clickhouse import ClickHouse
        from ooni_pipeline.clickhouse.lock import exclusive
        ch = ClickHouse("chdb://{chdb_path}")
        with exclusive(ch, "crashy", "dead-run", owner_alive=lambda other: None):
            os._exit(9)
        """
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert child.returncode == 9, child.stderr
    with ClickHouse(f"chdb://{chdb_path}") as again:
        assert again.scalar("SELECT count() FROM _lock_crashy") == 0  # ownerless
        start = time.monotonic()
        with exclusive(again, "crashy", "run-2", owner_alive=lambda other: None, poll_s=0.1):
            waited = time.monotonic() - start
            assert again.scalar("SELECT owner FROM _lock_crashy") == "run-2"
    assert waited < 20


def _dead_lock_of_this_version(ch: ClickHouse):
    dead = exclusive(ch, "race", "dead-run", owner_alive=lambda other: None)
    dead.__enter__()
    return dead  # kept: a collected generator would release it


def _dead_lock_of_the_previous_version(ch: ClickHouse) -> None:
    """What 8015a95 left: no comment, no token."""
    ch.command("CREATE TABLE _lock_race (owner String, since DateTime64(3)) ENGINE = Memory")
    ch.command("INSERT INTO _lock_race SELECT 'dead-run', now64(3)")


def _dead_lock_found_a_day_later(ch: ClickHouse) -> None:
    taken = time.time() - 25 * 3600
    ch.command(
        "CREATE TABLE _lock_race (owner String, token String, since DateTime64(3)) "
        f"ENGINE = Memory COMMENT 'dead-run 0123456789abcdef {taken:.3f} elsewhere:0:1:2'"
    )
    ch.command(
        "INSERT INTO _lock_race SELECT 'dead-run', '0123456789abcdef', now64(3) - INTERVAL 25 HOUR"
    )


@pytest.mark.parametrize(
    "dead_lock",
    [_dead_lock_of_this_version, _dead_lock_of_the_previous_version, _dead_lock_found_a_day_later],
)
def test_two_waiters_taking_over_one_dead_lock_never_hold_it_together(
    clickhouse: ClickHouseResource, ch: ClickHouse, dead_lock
) -> None:
    """Both waiters judge the same dead owner gone; the second renames only after the
    first has taken over and is inside (forced through ``owner_alive``): exactly one
    holds the lock at a time, the other waits for it. Whatever the dead lock's age or
    version (a tombstone is dated when it is made, never dropped by its maker)."""
    kept = dead_lock(ch)  # never released: its run has ended
    b_judging, a_inside = threading.Event(), threading.Event()
    inside: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def alive_for(owner: str):
        def alive(other: str) -> bool:
            if other != "dead-run":
                return True  # the other waiter is a live run
            if owner == "run-a":  # judges after run-b has read the dead owner too
                assert b_judging.wait(30)
            else:  # run-b acts on its judgement once run-a holds the lock
                b_judging.set()
                a_inside.wait(10)
            return False

        return alive

    def waiter(owner: str) -> None:
        try:
            with clickhouse.connect() as own:
                with exclusive(
                    own, "race", owner, owner_alive=alive_for(owner), poll_s=0.05, wait_s=60
                ):
                    inside.append(("in", owner))
                    a_inside.set()
                    time.sleep(0.5)
                    inside.append(("out", owner))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=waiter, args=(o,)) for o in ("run-a", "run-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert [event for event, _ in inside] == ["in", "out", "in", "out"], inside
    assert inside[0] == ("in", "run-a") and inside[1] == ("out", "run-a")
    assert inside[2:] == [("in", "run-b"), ("out", "run-b")]
    del kept


def test_a_lock_released_and_taken_between_two_reads_is_not_judged(ch: ClickHouse) -> None:
    """A waiter reads the lock's comment, then its row; between the two, the holder
    (whose process has since exited) releases and a live run takes the lock. Mixing the
    two holdings would judge the live run by the dead one's worker: marked failed and
    its lock renamed away. The waiter must look again instead."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_worker = this_worker().rpartition(":")[0] + f":{gone.pid}"
    ch.command(
        "CREATE TABLE _lock_split (owner String, token String, since DateTime64(3)) "
        f"ENGINE = Memory COMMENT 'run-old 1111111111111111 {time.time():.3f} {dead_worker}'"
    )
    ch.command("INSERT INTO _lock_split SELECT 'run-old', '1111111111111111', now64(3)")
    live = exclusive(ch, "split", "run-live", owner_alive=lambda other: True)
    read = ch.query_rows
    switched = []

    def query_rows(sql, *args, **kwargs):
        rows = read(sql, *args, **kwargs)
        if sql.startswith("SELECT comment FROM system.tables") and rows and not switched:
            switched.append(True)  # run-old releases, run-live takes the lock
            ch.query_rows = read
            ch.command("DROP TABLE _lock_split SYNC")
            live.__enter__()
            ch.query_rows = query_rows
        return rows

    ch.query_rows = query_rows
    marked_failed: list[str] = []
    try:
        with pytest.raises(LockTimeoutError, match="held by run-live"):
            with exclusive(
                ch,
                "split",
                "run-waiter",
                owner_alive=lambda other: True,
                on_dead_worker=marked_failed.append,
                wait_s=1.0,
                poll_s=0.1,
            ):
                pass
    finally:
        ch.query_rows = read
    assert switched and marked_failed == []
    assert ch.scalar("SELECT owner FROM _lock_split") == "run-live"


def test_a_worker_is_judged_gone_only_on_this_machine_and_namespace() -> None:
    """Another machine with this hostname, in the initial pid namespace (same inode on
    every Linux host), differs by its boot id: its workers are never judged here."""
    from ooni_pipeline.clickhouse.lock import worker_gone

    gone = subprocess.Popen(["true"])
    gone.wait()
    host, boot, namespace, _ = this_worker().split(":")
    assert worker_gone(f"{host}:{boot}:{namespace}:{gone.pid}")
    assert not worker_gone(this_worker())  # alive
    assert not worker_gone(f"{host}:{'0' * len(boot)}:{namespace}:{gone.pid}")  # a twin
    assert not worker_gone(f"{host}:{boot}:1:{gone.pid}")  # another container
    assert not worker_gone(f"{host}:{namespace}:{gone.pid}")  # the previous format


def test_stream_error_reaches_the_consumer(ch: ClickHouse) -> None:
    with pytest.raises(ClickHouseError, match="no_such_table"):
        list(ch.stream("SELECT * FROM no_such_table"))


def test_stream_consumer_may_stop_early(ch: ClickHouse) -> None:
    stream = ch.stream("SELECT number FROM numbers(5000000)")
    first = next(stream)
    stream.close()  # the read-ahead thread stops; the connection stays usable
    assert first.startswith(b"0\n")
    assert ch.scalar("SELECT 1") == 1


def test_a_lock_held_by_a_live_owner_times_out_and_an_unknown_old_one_is_taken_over(
    ch: ClickHouse,
) -> None:
    with exclusive(ch, "swap_x", "run-1", owner_alive=lambda other: None):
        with pytest.raises(LockTimeoutError, match="lock swap_x is still held by run-1"):
            with exclusive(
                ch, "swap_x", "run-2", owner_alive=lambda other: True, wait_s=0.3, poll_s=0.1
            ):
                pass
        # run-1 is unknown to run-3's instance: presumed working while the lock is young
        with pytest.raises(LockTimeoutError):
            with exclusive(
                ch, "swap_x", "run-3", owner_alive=lambda other: None, wait_s=0.3, poll_s=0.1
            ):
                pass
        ch.command("ALTER TABLE _lock_swap_x UPDATE since = since - INTERVAL 7 HOUR WHERE 1")
        with exclusive(ch, "swap_x", "run-3", owner_alive=lambda other: None, poll_s=0.1):
            assert ch.scalar("SELECT owner FROM _lock_swap_x") == "run-3"
    names = [
        r[0]
        for r in ch.query_rows(
            "SELECT name FROM system.tables WHERE database = currentDatabase() AND name LIKE '%lock%swap_x%'"
        )
    ]
    assert len(names) == 1 and names[0].startswith("_lock_dead_swap_x_"), names  # the tombstone


def test_a_query_runs_while_a_stream_is_open(ch: ClickHouse) -> None:
    """A stream, then other statements on the same connection before it is finished: a
    server refuses a second request in a busy session (SESSION_IS_LOCKED)."""
    stream = ch.stream("SELECT number FROM numbers(5000000)")
    first = next(stream)
    ch.command("CREATE TABLE during (x UInt8) ENGINE = MergeTree ORDER BY x")
    ch.insert_df("during", pd.DataFrame({"x": [1, 2]}))
    assert ch.count("during") == 2
    rest = b"".join(stream)
    assert (first + rest).count(b"\n") == 5_000_000


@pytest.mark.clickhouse_backends_except(
    "server-24.8", reason="its endpoint produces a result whole before sending it"
)
def test_a_failure_after_the_first_rows_reaches_the_consumer_with_the_servers_words(
    ch: ClickHouse,
) -> None:
    """The engine fails after megabytes of rows went out: the consumer gets the engine's
    error, and never the server's exception block as if it were data."""
    chunks: list[bytes] = []
    with pytest.raises(ClickHouseError, match="FUNCTION_THROW_IF_VALUE_IS_NON_ZERO"):
        for chunk in ch.stream(
            "SELECT number, throwIf(number = 3000000) FROM numbers(5000000)", prefetch=0
        ):
            chunks.append(chunk)
    assert chunks, "the failure came after some rows"
    assert not any(b"__exception__" in chunk for chunk in chunks)


@pytest.mark.clickhouse_backends("server")
def test_an_old_server_ends_a_failing_result_as_if_it_were_whole(
    ch: ClickHouse, clickhouse_server: ClickHouseHTTP
) -> None:
    """The rig answers as a server before 25.11 when asked: no exception tag, the
    failure's text after the rows as data, status 200 and a complete stream, so the
    client cannot tell; only a count made apart can (what every export checks)."""
    sql = "SELECT number FROM numbers(3000000) ORDER BY number"
    # past the first buffer_size (1 MiB), which the server holds to answer an early
    # failure with its status
    with (
        clickhouse_server.old_server(),
        clickhouse_server.failing_results("ORDER BY number", 4 << 20),
    ):
        body = b"".join(ch.stream(sql, prefetch=0))
    served = clickhouse_server.log[-1]
    assert served.status == 200 and not served.broken
    lines = body.decode().splitlines()
    assert lines[-1].startswith("Code: 241. DB::Exception: Memory limit")
    assert "MEMORY_LIMIT_EXCEEDED" in lines[-1]
    assert lines[:-1] == [str(n) for n in range(len(lines) - 1)]
    assert 4 << 20 <= len(body) < len("\n".join(str(n) for n in range(3000000)))
    with clickhouse_server.failing_results("ORDER BY number", 4 << 20):  # today's server
        with pytest.raises(ClickHouseError, match="MEMORY_LIMIT_EXCEEDED"):
            b"".join(ch.stream(sql, prefetch=0))
    assert ch.scalar("SELECT 1") == 1


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.clickhouse_backends("server")
def test_server_streams_a_large_result_whole_in_large_compressed_blocks(
    ch: ClickHouse, clickhouse_server: ClickHouseHTTP
) -> None:
    """5M rows (600 MB of CSV) arrive complete, as a chunked, zstd-compressed response,
    read in blocks of up to 1 MiB; neither end holds the result whole."""
    sql = "SELECT number, toString(number), repeat('x', 100) FROM numbers(5000000)"
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stream = ch.stream(sql)
        first = next(stream)
        assert len(first) >= 256 * 1024  # a block, not a line
        size, lines, last, blocks = len(first), first.count(b"\n"), first, 1
        for block in stream:
            assert len(block) <= STREAM_BLOCK
            size, lines, last, blocks = (
                size + len(block),
                lines + block.count(b"\n"),
                block,
                blocks + 1,
            )
    finally:
        done.set()
        sampler.join()
    assert lines == 5_000_000 and last.endswith(b'4999999,"4999999","' + b"x" * 100 + b'"\n')
    assert blocks >= 500 and size > 600_000_000
    served = clickhouse_server.log[-1]
    assert served.status == 200 and served.chunked and served.content_encoding == "zstd"
    assert served.chunks > 20 and served.body_bytes < size / 20  # compressed on the wire
    assert served.held_bytes < 16 << 20  # one engine block at most before the first send
    assert peak[0] - base < size / 3, f"peak RSS grew by {(peak[0] - base) / 1e6:.0f} MB"


GZIP_SQL = "SELECT number, toString(number * 7), 'constant text' FROM numbers(2000000)"


def _gzip_expected() -> bytes:
    return b"".join(b'%d,"%d","constant text"\n' % (n, n * 7) for n in range(2_000_000))


@pytest.mark.clickhouse_backends("server")
def test_a_server_gzips_a_result_itself_at_the_requested_level(
    ch: ClickHouse, clickhouse_server: ClickHouseHTTP
) -> None:
    """``stream_gzip`` gets the result as the server compressed it, at the level asked
    for (``http_zlib_compression_level``), streamed in blocks; the rig's FIFO is gone
    after."""
    sizes = {}
    for level in (1, 9):
        chunks = list(ch.stream_gzip(GZIP_SQL, fmt="CSV", level=level))
        assert len(chunks) > 1 and max(map(len, chunks)) <= STREAM_BLOCK
        data = b"".join(chunks)
        assert gzip.decompress(data) == _gzip_expected()
        sizes[level] = len(data)
        served = clickhouse_server.log[-1]
        assert served.status == 200 and served.content_encoding == "gzip"
    assert sizes[9] < sizes[1] * 0.9, sizes
    assert os.listdir(clickhouse_server._fifos) == []


@pytest.mark.clickhouse_backends("server")
@pytest.mark.parametrize(
    "sql, error",
    [
        ("SELECT * FROM no_such_table", "UNKNOWN_TABLE"),
        (
            "SELECT number, throwIf(number = 1500000) FROM numbers(2000000)",
            "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO",
        ),
    ],
)
def test_a_gzip_result_failing_before_or_after_its_first_bytes_raises(
    ch: ClickHouse, clickhouse_server: ClickHouseHTTP, sql: str, error: str
) -> None:
    """Before any byte (an unknown table) the server answers with the error's status and
    words; after megabytes, the response is cut and the exception block follows what the
    engine compressed. Either way the consumer raises and the endpoint is usable after."""
    with pytest.raises(ClickHouseError) as raised:
        list(ch.stream_gzip(sql, fmt="CSV", level=1))
    served = clickhouse_server.log[-1]
    if "no_such_table" in sql:
        assert error in str(raised.value) and served.status == 404
    else:
        assert served.broken and served.status == 200
    assert ch.scalar("SELECT 1") == 1
    assert os.listdir(clickhouse_server._fifos) == []


def _gzip_request(
    server: ClickHouseHTTP, query: str, accept: str = "gzip", **params: str
) -> tuple[int, bytes]:
    """One POST straight to the endpoint, asking for a gzip answer: (status, body)."""
    fields = {"enable_http_compression": "1", **params}
    credentials = base64.b64encode(f"{SERVER_USER}:{SERVER_PASSWORD}".encode()).decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/?{urllib.parse.urlencode(fields)}",
        data=query.encode(),
        headers={"Accept-Encoding": accept, "Authorization": f"Basic {credentials}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
            if response.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            return response.status, body
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.clickhouse_backends("server")
def test_a_gzip_result_keeps_settings_written_after_its_format(
    ch: ClickHouse, clickhouse_server: ClickHouseHTTP
) -> None:
    """``FORMAT TSV SETTINGS ...``: the settings after the format still apply when the
    answer is gzip (the engine's own compression cannot take them; Python's does)."""
    sql = "SELECT getSetting('max_threads') FORMAT TSV SETTINGS max_threads = 1"
    assert _gzip_request(clickhouse_server, sql) == (200, b"1\n")


@pytest.mark.clickhouse_backends("server")
def test_a_gzip_request_the_endpoint_cannot_read_starts_no_engine_write(
    ch: ClickHouse, clickhouse_server: ClickHouseHTTP
) -> None:
    """A ``buffer_size`` that is not a number fails the request before the engine
    starts writing: nothing is left waiting on a FIFO nobody reads."""
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _gzip_request(clickhouse_server, GZIP_SQL, buffer_size="1MiB")
    deadline = time.monotonic() + 10
    while clickhouse_server._requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert clickhouse_server._requests == 0
    assert os.listdir(clickhouse_server._fifos) == []


@pytest.mark.clickhouse_backends("server")
def test_a_gzip_request_in_a_session_leaves_the_sessions_settings_as_they_were(
    ch: ClickHouse, clickhouse_server: ClickHouseHTTP
) -> None:
    """The level the engine compresses at is set for the request only: a session
    keeps its own value, even when the request named the setting too."""
    read = "SELECT getSetting('output_format_compression_level') FORMAT TSV"
    status, default = _gzip_request(clickhouse_server, read, "identity", session_id="s-level")
    assert status == 200
    status, _ = _gzip_request(
        clickhouse_server,
        "SELECT number FROM numbers(10)",
        session_id="s-level",
        output_format_compression_level="7",
    )
    assert status == 200
    assert _gzip_request(clickhouse_server, read, "identity", session_id="s-level") == (
        200,
        default,
    )
    clickhouse_server.end_sessions()


@pytest.mark.clickhouse_backends("server")
def test_a_gzip_consumer_may_stop_early(ch: ClickHouse, clickhouse_server: ClickHouseHTTP) -> None:
    """A consumer that stops after its first block lets the server go on: the engine's
    write runs to its end, and the next request is served."""
    stream = ch.stream_gzip(GZIP_SQL, fmt="CSV", level=1)
    assert next(stream)[:2] == b"\x1f\x8b"
    stream.close()
    assert ch.scalar("SELECT 1") == 1
    deadline = time.monotonic() + 30
    while os.listdir(clickhouse_server._fifos) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(clickhouse_server._fifos) == []


@pytest.mark.clickhouse_backends("server")
def test_server_binds_hostile_parameters_in_the_url_and_in_a_form(ch: ClickHouse) -> None:
    """Values that would break SQL or the URL travel as bound parameters: short ones in
    the URL, long ones (over 4 KiB) in a multipart form; the engine sees them verbatim."""
    hostile = [
        "x'); DROP TABLE t; --\"\\",
        "tab\there\nnewline\rcr\\N\\t\\\\",
        "{s:String} $$heredoc$$ `tick` %00 %27 &param_s=1",
        "ünïcödé ✓ \u202e",
        "'" * 3000 + "\\" * 3000,  # over 4 KiB: sent as a form
    ]
    for value in hostile:
        assert ch.scalar("SELECT {s:String}", {"s": value}) == value
        assert ch.query_rows(
            "SELECT length({s:String}), {a:Array(String)}", {"s": value, "a": [value, "b"]}
        ) == [(len(value.encode()), [value, "b"])]


@pytest.mark.clickhouse_backends("server")
def test_server_errors_carry_the_code_and_never_the_password(
    ch: ClickHouse, clickhouse_server: ClickHouseHTTP
) -> None:
    with pytest.raises(ClickHouseError) as info:
        ch.command("SELECT * FROM no_such_table")
    assert "code: 60" in str(info.value) and "UNKNOWN_TABLE" in str(info.value)
    assert clickhouse_server.log[-1].status == 404
    # the engine's message quotes the statement, which quotes the password
    with pytest.raises(ClickHouseError) as info:
        ch.command(f"SELECT no_such_function('{SERVER_PASSWORD}')")
    assert "UNKNOWN_FUNCTION" in str(info.value) and SERVER_PASSWORD not in str(info.value)
    wrong = "wrong-pw-4c8e"
    with pytest.raises(ClickHouseError) as info:
        ClickHouse(clickhouse_server.url(SERVER_USER, wrong, SERVER_DATABASE))
    text = str(info.value)
    assert "516" in text and "AUTHENTICATION_FAILED" in text and wrong not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert clickhouse_server.log[-1].status == 403


@pytest.mark.clickhouse_backends("server")
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "zstd", "lz4"])
def test_endpoint_reads_compressed_insert_bodies(
    ch: ClickHouse, clickhouse_server: ClickHouseHTTP, encoding: str
) -> None:
    """What the server accepts from any client: the INSERT in the URL, its data as a
    compressed body (the rig's own check; clickhouse-connect sends zstd)."""
    import lz4.frame
    import requests
    import zstandard

    ch.command("CREATE TABLE packed (id UInt32, s String) ENGINE = MergeTree ORDER BY id")
    data = b"".join(b'%d,"row %d"\n' % (i, i) for i in range(100_000))
    body = {
        "gzip": lambda d: gzip.compress(d),
        "deflate": lambda d: zlib.compress(d),
        "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
        "lz4": lambda d: lz4.frame.compress(d),
    }[encoding](data)
    response = requests.post(
        f"http://127.0.0.1:{clickhouse_server.port}/",
        params={"query": "INSERT INTO packed FORMAT CSV", "database": SERVER_DATABASE},
        data=body,
        headers={"Content-Encoding": encoding},
        auth=(SERVER_USER, SERVER_PASSWORD),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert json.loads(response.headers["X-ClickHouse-Summary"])["written_rows"] == "100000"
    assert ch.query_rows("SELECT count(), sum(id), max(s) FROM packed") == [
        (100_000, 4_999_950_000, "row 99999")
    ]


@pytest.mark.clickhouse_backends("server")
def test_a_server_never_gets_ooni_tables_implicitly(ch: ClickHouse) -> None:
    """A missing OONI table on a server fails at once, naming the table and the server
    (password hidden); nothing is created. Staging tables still are."""
    ch.command("DROP TABLE fastpath SYNC")
    with pytest.raises(MissingTableError) as info:
        ensure_tables(ch, "asnmeta", "fastpath")
    message = str(info.value)
    assert f"table fastpath does not exist on http://{SERVER_USER}:***@127.0.0.1:" in message
    assert SERVER_PASSWORD not in message
    assert "python -m ooni_pipeline.clickhouse.schema fastpath" in message
    assert (
        ch.scalar(
            "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = 'fastpath'"
        )
        == 0
    )
    ensure_tables(ch, "asnmeta_tmp")
    assert (
        ch.scalar(
            "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = 'asnmeta_tmp'"
        )
        == 1
    )


@pytest.mark.clickhouse_backends("server")
def test_a_rejected_insert_reports_the_engines_error(ch: ClickHouse) -> None:
    """A bad row megabytes into a streamed insert: the engine's own error comes back
    (the server reads the rest of the body before answering, as ClickHouse does)."""
    ch.command("CREATE TABLE strict (id UInt32, s String) ENGINE = MergeTree ORDER BY id")

    def rows():
        for n in range(20):
            yield b"".join(b'%d,"ok"\n' % i for i in range(n * 50_000, (n + 1) * 50_000))
            if n == 5:
                yield b'not-a-number,"bad"\n'

    with pytest.raises(ClickHouseError, match="CANNOT_PARSE|Cannot parse"):
        ch.raw_insert("strict", rows(), fmt="CSV")


@pytest.mark.parametrize(
    "stream, ends_with_error",
    [
        (b'"IT",3269,"x.org",4\n', False),
        (
            b'"IT",3269,"x.org",4\nCode: 241. DB::Exception: Memory limit (for query) exceeded. (MEMORY_LIMIT_EXCEEDED) (version 24.8.4.13 (official build))\n',
            True,
        ),
        # a row cut mid-way, the text right after it: the count can come out right
        (
            b'"IT",3269,"x.org",4\n"IR",12,"y.oCode: 241. DB::Exception: Memory limit. (MEMORY_LIMIT_EXCEEDED) (version 24.8.4.13)',
            True,
        ),
        # other exception classes, and servers before 21.x (review)
        (
            b'"IT",1\nCode: 210. DB::NetException: Connection reset by peer, while reading from socket (10.0.0.2:9000). (NETWORK_ERROR) (version 23.8.1)\n',
            True,
        ),
        (
            b'"IT",1\nCode: 241, e.displayText() = DB::Exception: Memory limit (for query) exceeded (version 20.8.3.18)\n',
            True,
        ),
        # a probe's text in the last field is in quotes: never taken for the server's
        (b'"IT",3269,"Code: 1. DB::Exception: x (version 1)"\n', False),
        (b'"a","b (version 2)"\r\n', False),
    ],
)
def test_an_old_servers_error_text_is_told_from_a_last_row(
    stream: bytes, ends_with_error: bool
) -> None:
    from ooni_pipeline.clickhouse.connection import StreamTail

    whole, split = StreamTail(), StreamTail()
    whole.add(stream)
    for i in range(0, len(stream), 7):  # however the stream arrives
        split.add(stream[i : i + 7])
    assert whole.ends_with_server_error() is split.ends_with_server_error() is ends_with_error


def test_a_csv_with_the_right_count_ending_with_an_error_text_is_not_published(
    local_store_resource,
) -> None:
    from ooni_pipeline.exports.publish import IncompleteExportError, write_csv

    store = local_store_resource.get_store()
    store.put_bytes("exports/x.csv.gz", b"previous")
    body = [
        b'"IT",1\n',
        b'"IR",2\n"CN",Code: 241. DB::Exception: x. (MEMORY_LIMIT_EXCEEDED) (version 24.8)\n',
    ]
    with pytest.raises(IncompleteExportError, match="the last one an error text"):
        write_csv(store, "exports/x.csv.gz", ("cc", "n"), body, 6, rows=3)
    assert store.read_bytes("exports/x.csv.gz") == b"previous"


_DDL = re.compile(r"\s*(CREATE|ALTER|DROP|RENAME|EXCHANGE|TRUNCATE)\b", re.IGNORECASE)
_CREATED = re.compile(r"CREATE TABLE (?:IF NOT EXISTS )?`?(\w+)`?")


@pytest.mark.clickhouse_backends("server")
def test_a_cluster_receives_owned_tables_on_cluster_and_keeps_scratch_local(
    clickhouse: ClickHouseResource, ch: ClickHouse, clickhouse_server: ClickHouseHTTP
) -> None:
    """With ``OONI_CLICKHOUSE_CLUSTER`` set: what a node of OONI's cluster would be
    sent, recorded by the endpoint and parsed by ClickHouse's own parser."""
    for table in ("asnmeta", "asnmeta_tmp", "fingerprints_dns", "fingerprints_dns_tmp"):
        ch.command(f"DROP TABLE IF EXISTS {table} SYNC")
    on_cluster = ClickHouseResource(url=clickhouse.url, cluster="oonidata_cluster")
    with clickhouse_server.cluster("oonidata_cluster") as sent, on_cluster.connect() as node:
        for rows in ([(1, "old")], [(2, "new"), (3, "new")]):
            replace_table(node, live="asnmeta", staging="asnmeta_tmp", fill=_fill_asnmeta(rows))
        replace_table(
            node,
            live="fingerprints_dns",
            staging="fingerprints_dns_tmp",
            fill=lambda c, t: c.command(
                f"INSERT INTO {t} (name, scope, pattern_type, pattern) VALUES ('a', 'nat', 'full', 'x')"
            ),
        )
        ensure_tables(node, "blocking_status", "blocking_events", "blocking_status_redo")
        ensure_tables(node, "blocking_consumer_announced")
        ensure_tables(node, "blocking_status_tmp")
        with exclusive(node, "cluster_probe", "run-1", owner_alive=lambda other: None):
            pass
    assert ch.query_rows("SELECT asn FROM asnmeta ORDER BY asn") == [(2,), (3,)]
    ddl = [statement for statement in sent if _DDL.match(statement)]
    for statement in ddl:  # ClickHouse's own parser accepts every one
        assert ch.scalar("SELECT formatQuery({q:String})", {"q": statement})
    created = {_CREATED.search(s).group(1): s for s in ddl if _CREATED.search(s)}
    owned = (
        "asnmeta",
        "fingerprints_dns",
        "blocking_status",
        "blocking_events",
        "blocking_status_redo",
        "blocking_consumer_announced",
    )
    for table in owned:
        assert "ON CLUSTER `oonidata_cluster`" in created[table], created[table]
    for table in owned:
        if table != "fingerprints_dns":
            assert "ENGINE = Replicated" in created[table]
    assert "ENGINE = EmbeddedRocksDB" in created["fingerprints_dns"]  # never replicated
    paths = re.findall(r"'(/clickhouse/[^']+)'", " ".join(created.values()))
    assert len(paths) == 5 and len(set(paths)) == 5, paths  # no Keeper path shared
    local = ("asnmeta_tmp", "fingerprints_dns_tmp", "blocking_status_tmp", "_lock_cluster_probe")
    for table in local:
        assert "ON CLUSTER" not in created[table] and "Replicated" not in created[table]
    exchanges = [s for s in ddl if s.lstrip().upper().startswith("EXCHANGE")]
    assert exchanges and all("fingerprints_dns" in s for s in exchanges)  # never a MergeTree
    assert any("REPLACE PARTITION" in s and "`asnmeta`" in s for s in ddl)


@pytest.mark.parametrize(
    ("engine_full", "expected"),
    [
        (  # OONI's citizenlab on its cluster (ooni/devops cluster-migration/schema.sql)
            "ReplicatedReplacingMergeTree('/clickhouse/{cluster}/tables/ooni/citizenlab/{shard}', "
            "'{replica}') ORDER BY (domain, url, cc, category_code) SETTINGS index_granularity = 4",
            "ReplacingMergeTree() ORDER BY (domain, url, cc, category_code) SETTINGS index_granularity = 4",
        ),
        (  # OONI's fastpath: the version column after the Keeper arguments
            "ReplicatedReplacingMergeTree('/clickhouse/{cluster}/tables/ooni/fastpath/{shard}', "
            "'{replica}', update_time) ORDER BY (measurement_start_time, report_id) "
            "SETTINGS index_granularity = 8192",
            "ReplacingMergeTree(update_time) ORDER BY (measurement_start_time, report_id) "
            "SETTINGS index_granularity = 8192",
        ),
        (  # Keeper arguments left to the server's defaults; a quote and a comma in a path
            "ReplicatedReplacingMergeTree(ver) PARTITION BY toDate(t) ORDER BY k",
            "ReplacingMergeTree(ver) PARTITION BY toDate(t) ORDER BY k",
        ),
        (
            "ReplicatedMergeTree('/p/it\\'s, (odd)/{shard}', '{replica}') ORDER BY (a, b)",
            "MergeTree() ORDER BY (a, b)",
        ),
        ("MergeTree ORDER BY (asn, changed)", "MergeTree() ORDER BY (asn, changed)"),
    ],
)
def test_a_replicated_engine_has_a_local_twin_without_its_keeper_path(
    ch: ClickHouse, engine_full: str, expected: str
) -> None:
    assert plain_engine(engine_full) == expected
    ddl = f"CREATE TABLE t (a Int8, b Int8, k Int8, ver Int8, t Date) ENGINE = {plain_engine(engine_full)}"
    assert "Replicated" not in ch.scalar("SELECT formatQuery({q:String})", {"q": ddl})


@pytest.mark.clickhouse_backends("embedded")
def test_the_project_creates_oonis_tables_exactly_as_oonis_ddl_does(ch: ClickHouse) -> None:
    """What ``python -m ooni_pipeline.clickhouse.schema`` prints, and what the embedded
    default creates, is OONI's DDL (docs/Database.md): same SHOW CREATE TABLE."""
    from ooni_pipeline_tests.conftest import operator_ddl

    ooni = operator_ddl(additions=False)
    for table in ("fastpath", "citizenlab", "fingerprints_dns", "fingerprints_http", "asnmeta"):
        ch.command(ooni[table].replace(f"CREATE TABLE {table}", "CREATE TABLE oonis_own", 1))
        ch.command(create_table_sql(table))
        theirs = ch.scalar("SHOW CREATE TABLE oonis_own").replace("oonis_own", table)
        assert ch.scalar(f"SHOW CREATE TABLE {table}") == theirs, table
        ch.command("DROP TABLE oonis_own SYNC")
    printed = subprocess.run(
        [sys.executable, "-m", "ooni_pipeline.clickhouse.schema", "citizenlab"],
        capture_output=True,
        text=True,
        env={**os.environ, "OONI_CLICKHOUSE_CLUSTER": "oonidata_cluster"},
        check=True,
    ).stdout
    assert "ON CLUSTER `oonidata_cluster`" in printed and "index_granularity = 4" in printed
    assert ch.scalar("SELECT formatQuery({q:String})", {"q": printed.strip().rstrip(";")})


_ASNMETA_COLUMNS = (
    "asn UInt32, org_name String, cc String, changed Date, aut_name String, source String"
)


def _fill_by_country(rows_sql: str):
    def fill(c: ClickHouse, table: str) -> None:
        c.command(f"INSERT INTO {table} (asn, org_name, cc, changed, aut_name, source) {rows_sql}")

    return fill


def test_an_operators_partitioned_table_is_replaced_exactly_and_a_cut_says_so(
    ch: ClickHouse,
) -> None:
    """PARTITION BY cc: partitions the new data lacks leave, every new one comes in;
    cut after the first statements, the error says the table is partly replaced, and
    nothing of the new data that is in is missing."""
    ch.command("DROP TABLE IF EXISTS asnmeta SYNC")  # the server's operator table
    ch.command(
        f"CREATE TABLE asnmeta ({_ASNMETA_COLUMNS}) ENGINE = MergeTree PARTITION BY cc "
        "ORDER BY (asn, changed)"
    )
    countries = "['AA', 'BB', 'CC', 'DD'][number % 4 + 1]"
    old = f"SELECT number, 'old', {countries}, today(), '', '' FROM numbers(40)"
    new = (
        f"SELECT number, 'new', {countries}, today(), '', '' FROM numbers(40) WHERE number % 4 != 1"
    )
    replace_table(ch, live="asnmeta", staging="asnmeta_tmp", fill=_fill_by_country(old))
    replace_table(ch, live="asnmeta", staging="asnmeta_tmp", fill=_fill_by_country(new))
    by_country = "SELECT cc, org_name, count() FROM asnmeta GROUP BY ALL ORDER BY ALL"
    assert ch.query_rows(by_country) == [("AA", "new", 10), ("CC", "new", 10), ("DD", "new", 10)]

    replace_table(ch, live="asnmeta", staging="asnmeta_tmp", fill=_fill_by_country(old))
    command, alters = ch.command, []

    def cut_at_the_third_alter(sql, *args, **kwargs):
        if sql.startswith("ALTER TABLE"):
            alters.append(sql)
            if len(alters) == 3:
                raise RuntimeError("connection reset by peer")
        return command(sql, *args, **kwargs)

    ch.command = cut_at_the_third_alter
    try:
        with pytest.raises(TableUpdateError, match=r"partly replaced \(2 of 4 partitions\)"):
            replace_table(ch, live="asnmeta", staging="asnmeta_tmp", fill=_fill_by_country(new))
    finally:
        ch.command = command
    assert all("REPLACE PARTITION" in sql for sql in alters)  # new data first, drops last
    rows = ch.query_rows(by_country)
    assert sum(n for _, kind, n in rows if kind == "new") == 20 and len(rows) == 4
    replace_table(ch, live="asnmeta", staging="asnmeta_tmp", fill=_fill_by_country(new))
    assert ch.query_rows(by_country) == [("AA", "new", 10), ("CC", "new", 10), ("DD", "new", 10)]


def test_a_projection_the_operator_redefined_rebuilds_the_staging_twin(ch: ClickHouse) -> None:
    ch.command("DROP TABLE IF EXISTS asnmeta SYNC")
    ch.command(
        f"CREATE TABLE asnmeta ({_ASNMETA_COLUMNS}, "
        "PROJECTION p (SELECT cc, count() GROUP BY cc)) ENGINE = MergeTree ORDER BY (asn, changed)"
    )
    rows = "SELECT number, 'n', 'IT', today(), '', '' FROM numbers(5)"
    replace_table(ch, live="asnmeta", staging="asnmeta_tmp", fill=_fill_by_country(rows))
    ch.command("ALTER TABLE asnmeta DROP PROJECTION p")
    ch.command("ALTER TABLE asnmeta ADD PROJECTION p (SELECT org_name, count() GROUP BY org_name)")
    definition = ch.scalar("SHOW CREATE TABLE asnmeta")
    for _ in range(2):
        replace_table(ch, live="asnmeta", staging="asnmeta_tmp", fill=_fill_by_country(rows))
    assert ch.scalar("SHOW CREATE TABLE asnmeta") == definition and ch.count("asnmeta") == 5


def test_a_rocksdb_table_in_a_directory_of_its_own_is_refused_clearly(
    ch: ClickHouse, tmp_path: Path
) -> None:
    rocks = tmp_path / "rocks"
    ch.command("DROP TABLE IF EXISTS fingerprints_dns SYNC")
    ch.command(
        "CREATE TABLE fingerprints_dns (name String, pattern String) "
        f"ENGINE = EmbeddedRocksDB(0, '{rocks}') PRIMARY KEY name"
    )
    ch.command("INSERT INTO fingerprints_dns VALUES ('a', 'x')")
    with pytest.raises(StagingMismatchError, match="rocksdb_dir"):
        replace_table(
            ch,
            live="fingerprints_dns",
            staging="fingerprints_dns_tmp",
            fill=lambda c, t: c.command(f"INSERT INTO {t} VALUES ('b', 'y')"),
        )
    assert ch.query_rows("SELECT name FROM fingerprints_dns") == [("a",)]


def _csv_rows(count: int, start: int = 0) -> bytes:
    return "".join(f"{n},row {n}\n" for n in range(start, start + count)).encode()


@pytest.mark.clickhouse_backends("embedded")
def test_a_statement_reads_a_stream_while_it_is_produced(ch: ClickHouse) -> None:
    """command_reading: the statement has read the first rows before the last ones are
    produced (the engine works as Python produces), and every row arrives once."""
    ch.command("CREATE TABLE streamed (n UInt32, s String) ENGINE = Memory")
    seen_before_last: list[int] = []

    def blocks():
        for block in range(20):
            yield _csv_rows(5_000, block * 5_000)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not seen_before_last:
            # the INSERT is still running; its rows so far are not visible, but its
            # progress is: wait until it has read data
            read = ch._chdb().query(
                "SELECT sum(read_rows) FROM system.processes WHERE query LIKE 'INSERT INTO streamed%'",
                "CSV",
            )
            rows = int(read.bytes().strip() or 0)
            if rows:
                seen_before_last.append(rows)
            time.sleep(0.05)
        yield _csv_rows(1, 100_000)

    ch.command_reading(
        lambda source: f"INSERT INTO streamed SELECT n, s FROM {source}",
        blocks(),
        "n UInt32, s String",
        "CSV",
    )
    assert seen_before_last and seen_before_last[0] > 0
    assert ch.query_rows("SELECT count(), uniqExact(n), max(n) FROM streamed") == [
        (100_001, 100_001, 100_000)
    ]


@pytest.mark.clickhouse_backends("embedded")
def test_a_failing_statement_or_stream_fails_the_call_without_hanging(ch: ClickHouse) -> None:
    ch.command("CREATE TABLE streamed_fail (n UInt32) ENGINE = Memory")

    def rows(count: int):
        yield from (f"{n}\n".encode() for n in range(count))

    started = time.monotonic()
    # the statement fails before it reads: the stream is not consumed
    with pytest.raises(ClickHouseError, match="UNKNOWN_TABLE|does not exist"):
        ch.command_reading(
            lambda source: f"INSERT INTO nowhere SELECT * FROM {source}",
            rows(10),
            "n UInt32",
            "CSV",
        )
    # the statement fails half-way: the producer stops, the engine's error is raised
    with pytest.raises(ClickHouseError, match="too big"):
        ch.command_reading(
            lambda source: (
                f"INSERT INTO streamed_fail SELECT throwIf(n > 50000, 'too big') + n FROM {source}"
            ),
            (
                b"".join(f"{n}\n".encode() for n in range(k, k + 1000))
                for k in range(0, 10_000_000, 1000)
            ),
            "n UInt32",
            "CSV",
        )

    # the stream fails: its own error reaches the caller, unchanged
    class Boom(RuntimeError):
        pass

    def failing():
        yield b"1\n2\n"
        raise Boom("the source broke")

    with pytest.raises(Boom, match="the source broke"):
        ch.command_reading(
            lambda source: f"INSERT INTO streamed_fail SELECT * FROM {source}",
            failing(),
            "n UInt32",
            "CSV",
        )
    assert time.monotonic() - started < 60


_CANCELLED_WHILE_PLANNING = r"""
import signal, sys, threading, time, os
from ooni_pipeline.clickhouse.resource import ClickHouseResource

class Cancelled(Exception):
    pass

def cancel(*_):
    raise Cancelled()

def watchdog():
    time.sleep(30)
    print("HANG", flush=True)
    os._exit(3)

with ClickHouseResource(url=f"chdb://{sys.argv[1]}", lock_timeout_s=60).connect() as ch:
    ch.command("CREATE TABLE t (n UInt32) ENGINE = Memory")
    threading.Thread(target=watchdog, daemon=True).start()
    signal.signal(signal.SIGALRM, cancel)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        ch.command_reading(
            lambda source: f"INSERT INTO t SELECT n FROM {source} "
            "WHERE (SELECT sleepEachRow(1) FROM numbers(1)) = 0",
            iter([b"1\n2\n"]),
            "n UInt32",
            "CSV",
        )
        print("RETURNED", flush=True)
    except Cancelled:
        print("CANCELLED", flush=True)
"""


def test_command_reading_cancelled_before_the_engine_opens_its_fifo_returns(tmp_path) -> None:
    """A run cancelled (SIGTERM becomes an exception in the main thread) while the
    engine is still planning the statement (1 s of scalar subquery here, the
    fingerprint subqueries in the scoring statement): the engine then opens the FIFO
    and waited forever for a writer, and so did the call (review of 26e5956). The
    call must raise the cancellation and leave no FIFO directory. In a child process,
    with a watchdog."""
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("ooni-stream-*"))
    done = subprocess.run(
        [sys.executable, "-c", _CANCELLED_WHILE_PLANNING, str(tmp_path / "ch")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "CANCELLED" in done.stdout, done.stdout + done.stderr[-800:]
    assert set(Path(tempfile.gettempdir()).glob("ooni-stream-*")) <= before


def test_the_24_8_endpoint_binds_only_a_requests_own_parameters(clickhouse_server_24) -> None:
    """The 24.8 endpoint shares one engine connection between requests: a parameter an
    earlier request bound must not answer for a later one, which a server fails
    (UNKNOWN_QUERY_PARAMETER), else a test could pass there that fails on OONI's."""
    auth = "Basic " + base64.b64encode(f"{SERVER_USER}:{SERVER_PASSWORD}".encode()).decode()

    def post(sql: str, **params: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{clickhouse_server_24.port}/?" + urllib.parse.urlencode(params)
        request = urllib.request.Request(url, sql.encode(), {"Authorization": auth})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    assert post("SELECT {earlier:String}", param_earlier="stale") == (200, "stale\n")
    status, text = post("SELECT {earlier:String}")
    assert status != 200 and "UNKNOWN_QUERY_PARAMETER" in text, (status, text)
    assert post("SELECT '{earlier:String}'") == (200, "{earlier:String}\n")
