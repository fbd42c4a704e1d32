"""docs/consumers.md runs (#26, 3): every fenced block of the guide is executed as a
reader would, with no credentials, against exports the rig materializes in a moto
bucket made public with the project's own policy (``operations/public_read.py``).

Shell blocks run in bash (``-euo pipefail``) after the guide's settings block, with its
``BUCKET=`` and ``BASE=`` lines pointed at the test bucket; Python blocks with this
interpreter, their ``BUCKET``/``BASE`` lines likewise; ClickHouse SQL through chDB (the
engine of ``clickhouse local``) in a process of its own. All of them run in order in one
directory, as a reader following the page; what they leave there is compared with
the published objects. A block the tests cannot run is listed in ``NOT_EXECUTED`` with
its reason, and a test fails when the guide and that list disagree.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import boto3
import dagster as dg
import pandas as pd
import pytest

from ooni_pipeline.clickhouse import ClickHouseResource, quote_identifier
from ooni_pipeline.detector.feeds import (
    GLOBAL_KEY,
    build_feed,
    build_watchlist_feed,
    watchlist_feed_key,
)
from ooni_pipeline.exports import aggregates, parquet, watchlists
from ooni_pipeline.exports.daily_consumers import build_daily_consumer_exports
from ooni_pipeline.exports.manifest import MANIFEST_KEY
from ooni_pipeline.exports.website_metrics import object_key as wm_key
from ooni_pipeline.exports.website_metrics import website_metrics
from ooni_pipeline.object_store import ObjectStoreResource
from ooni_pipeline.operations import public_read
from ooni_pipeline_tests.rig import failure_text
from ooni_pipeline_tests.test_exports import _insert, _msm

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "consumers.md"
DOC_BUCKET = "ooni-data"
DAYS = ("2024-03-09", "2024-03-10")
WATCHLISTS = {"bbc": ("bbc.com", "bbc.co.uk")}

# (info string, first line of the block) -> why the tests do not run it.
NOT_EXECUTED = {
    ("sql duckdb", "INSTALL httpfs;  -- downloads from extensions.duckdb.org the first time"): (
        "DuckDB is not a dependency of the project, and cannot be installed offline; "
        "the same query runs in the ClickHouse block"
    ),
}
RUNNERS = ("sh", "python", "sql clickhouse")


@dataclass
class Block:
    info: str
    line: int  # of the opening fence, 1-based
    code: str

    @property
    def first_line(self) -> str:
        return self.code.splitlines()[0]

    @property
    def needs_aws_cli(self) -> bool:
        return self.info == "sh" and re.search(r"^aws ", self.code, re.M) is not None

    def __str__(self) -> str:
        return f"docs/consumers.md:{self.line} ({self.info})"


def guide_blocks() -> list[Block]:
    blocks, fence, info, start, lines = [], None, "", 0, []
    for number, line in enumerate(GUIDE.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            match = re.match(r"^(```+)\s*(.*)$", line)
            if match:
                fence, info, start, lines = match.group(1), match.group(2).strip(), number, []
        elif line.strip() == fence:
            blocks.append(Block(info, start, "\n".join(lines) + "\n"))
            fence = None
        else:
            lines.append(line)
    assert fence is None, f"docs/consumers.md:{start}: unclosed fence"
    return blocks


def test_every_block_of_the_guide_is_run_or_a_listed_exception() -> None:
    blocks = guide_blocks()
    skipped = {(b.info, b.first_line) for b in blocks if b.info not in RUNNERS}
    assert skipped == set(NOT_EXECUTED), "a block no test runs, or a stale exception"
    kinds = [b.info for b in blocks]
    # The guide's promise: shell, Python and SQL, the settings block first of the shell.
    assert {"sh", "python", "sql clickhouse"} <= set(kinds)
    assert "BASE=" in next(b for b in blocks if b.info == "sh").code
    # The README's bugs (#26): curl without --fail saved an error page; two "one day"
    # downloads wrote the same local name.
    for block in blocks:
        for command in re.findall(r"^curl .*$", block.code, re.M):
            assert "--fail" in command and "--location" in command, f"{block}: {command}"
            assert " -O" not in command, f"{block}: {command}"
    outputs = re.findall(r'curl [^\n]*?-o "?([^" ]+)"?', GUIDE.read_text(encoding="utf-8"))
    assert len(outputs) == len(set(outputs)) >= 5, outputs


# -- the published bucket -----------------------------------------------------------

# IR blocks signal.org by DNS on both days and www.signal.org by TCP on the 10th; IT
# reaches it. Domains of bbc's watchlist, and rows of other domains.
ROWS = [
    ("g01", "2024-03-09 08:00:00", "IR", 197207, "https://signal.org/", "signal.org", "dns"),
    ("g02", "2024-03-09 09:30:00", "GB", 2856, "https://news.bbc.co.uk/", "news.bbc.co.uk", ""),
    ("g03", "2024-03-10 01:00:00", "IR", 197207, "https://signal.org/", "signal.org", "dns"),
    ("g04", "2024-03-10 02:00:00", "IR", 44244, "https://www.signal.org/", "www.signal.org", "tcp_ip"),
    ("g05", "2024-03-10 03:00:00", "IT", 30722, "https://signal.org/", "signal.org", ""),
    ("g06", "2024-03-10 04:00:00", "GB", 2856, "https://www.bbc.com/news", "www.bbc.com", ""),
    ("g07", "2024-03-10 05:00:00", "DE", 3320, "https://notsignal.org/", "notsignal.org", "dns"),
    ("g08", "2024-03-10 06:00:00", "IR", 197207, "https://notbbc.com/", "notbbc.com", ""),
]  # fmt: skip


@dataclass
class Published:
    bucket: str
    base: str  # the bucket's web address on moto, as BASE is on AWS
    endpoint: str
    client: object  # signed, the operator's


def _run_assets(assets, keys, resources, partition):
    result = dg.materialize(
        assets,
        selection=dg.AssetSelection.assets(*keys),
        resources=resources,
        partition_key=partition,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert result.success, failure_text(result)


@pytest.fixture(scope="module")
def published(chdb_path: Path, moto_endpoint: str) -> Published:
    """Exports of two days, their month, a feed and the manifest, as the project writes
    them, in a bucket of their own; not yet public."""
    bucket = f"ooni-guide-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    clickhouse = ClickHouseResource(url=f"chdb://{chdb_path}", lock_timeout_s=60)
    with clickhouse.connect() as ch:
        for (table,) in ch.query_rows(
            "SELECT name FROM system.tables WHERE database = currentDatabase()"
        ):
            ch.command(f"DROP TABLE IF EXISTS {quote_identifier(table)} SYNC")
        _insert(
            ch,
            [
                _msm(uid, start, probe_cc=cc, probe_asn=asn, input=url, domain=domain,
                     anomaly="t" if blocking else "f", blocking_type=blocking)
                for uid, start, cc, asn, url, domain, blocking in ROWS
            ],
        )  # fmt: skip
    store_resource = ObjectStoreResource(
        bucket=bucket, endpoint_url=moto_endpoint, region_name="us-east-1", part_size_mb=5
    )
    resources = {"clickhouse": clickhouse, "object_store": store_resource}
    daily, daily_checks = build_daily_consumer_exports(WATCHLISTS)
    daily_keys = [
        aggregates.DAILY_KEY,
        parquet.WEBSITE_METRICS_PARQUET_KEY,
        *(watchlists.asset_key(c) for c in WATCHLISTS),
    ]
    for day in DAYS:
        _run_assets([website_metrics], [website_metrics.key], resources, day)
        _run_assets([daily, *daily_checks], daily_keys, resources, day)
    monthly = [aggregates.website_metrics_monthly, aggregates.website_metrics_monthly_check]
    _run_assets(monthly, [aggregates.MONTHLY_KEY], resources, "2024-03")
    empty = pd.DataFrame(columns=["status", "probe_cc", "updated", "event_id"])
    generated = datetime(2024, 3, 11, tzinfo=timezone.utc)
    store_resource.get_store().put_bytes(GLOBAL_KEY, build_feed(empty, None, generated))
    store_resource.get_store().put_bytes(
        watchlist_feed_key("bbc"), build_watchlist_feed(empty, "bbc", generated)
    )
    return Published(bucket, f"{moto_endpoint}/{bucket}", moto_endpoint, client)


@pytest.fixture(scope="module")
def public(published: Published) -> Published:
    public_read.apply_public_read(published.client, published.bucket)
    return published


def _object(published: Published, key: str) -> bytes:
    return published.client.get_object(Bucket=published.bucket, Key=key)["Body"].read()


# -- running the blocks -------------------------------------------------------------


def _reader_env(published: Published, home: Path) -> dict[str, str]:
    """A reader's environment: no AWS credentials, no project settings; the AWS CLI
    pointed at moto (the one thing AWS's own address would do)."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
    env.update({k: v for k, v in os.environ.items() if k.startswith("PYENV")})
    env["HOME"] = os.environ.get("HOME", str(home))
    env["AWS_ENDPOINT_URL"] = published.endpoint
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(home / "no-aws-config")
    return env


def _substitute(block: Block, published: Published) -> str:
    """The block with the guide's bucket replaced by the test bucket, checked done."""
    code = block.code
    if block.info == "sh":
        code, n = re.subn(r"^BUCKET=\S+", f"BUCKET={published.bucket}", code, flags=re.M)
        code, m = re.subn(r'^BASE=("[^"]*"|\S+)', f"BASE={published.base}", code, flags=re.M)
        assert (n, m) in ((0, 0), (1, 1)), block
    elif block.info == "python":
        code, n = re.subn(r'^BUCKET = "[^"]*"', f'BUCKET = "{published.bucket}"', code, flags=re.M)
        code, m = re.subn(r"^BASE = .*$", f'BASE = "{published.base}/"', code, flags=re.M)
        assert (n, m) == (1, 1), f"{block}: no BUCKET/BASE line to point at the test bucket"
    else:
        doc_base = f"https://{DOC_BUCKET}.s3.amazonaws.com"
        assert doc_base in code, block
        code = code.replace(doc_base, published.base)
    assert DOC_BUCKET not in code, f"{block}: the guide's bucket left in the code run"
    return code


def _run_block(block: Block, code: str, cwd: Path, env: dict[str, str], settings: str):
    if block.info == "sh":
        argv, stdin = ["bash", "-euo", "pipefail", "-s"], settings + code
    elif block.info == "python":
        argv, stdin = [sys.executable, "-"], code
    else:  # chDB: the engine of clickhouse-local, in a process of its own
        argv = [sys.executable, "-c", "import chdb, sys; print(chdb.query(sys.stdin.read(), 'CSV'), end='')"]  # fmt: skip
        stdin = code
    return subprocess.run(
        argv, input=stdin, cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )


def _run_guide(published: Published, cwd: Path, home: Path, select) -> dict[int, str]:
    """Run the selected blocks in order in ``cwd``; their outputs by line."""
    blocks = guide_blocks()
    settings_block = next(b for b in blocks if b.info == "sh")
    settings = _substitute(settings_block, published)
    env = _reader_env(published, home)
    outputs = {}
    for block in blocks:
        if block.info not in RUNNERS or block is settings_block or not select(block):
            continue
        done = _run_block(block, _substitute(block, published), cwd, env, settings)
        assert done.returncode == 0, (
            f"{block} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
        outputs[block.line] = done.stdout
    return outputs


def test_the_one_day_commands_fail_loudly_on_a_private_bucket(
    published: Published, tmp_path: Path
) -> None:
    # Before the policy (README #26: curl -O saved the 403 page and exited 0).
    block = next(b for b in guide_blocks() if b.info == "sh" and "DAY=" in b.code)
    settings = _substitute(next(b for b in guide_blocks() if b.info == "sh"), published)
    policy = public_read.current_policy(published.client, published.bucket)
    if policy is not None:  # the public tests ran first
        published.client.delete_bucket_policy(Bucket=published.bucket)
    try:
        assert _object(published, MANIFEST_KEY)  # exported, only private
        env = _reader_env(published, tmp_path)
        done = _run_block(block, _substitute(block, published), tmp_path, env, settings)
    finally:
        if policy is not None:
            published.client.put_bucket_policy(Bucket=published.bucket, Policy=json.dumps(policy))
    assert done.returncode == 22, done.stderr  # curl --fail: HTTP 403
    assert "403" in done.stderr
    assert not list(tmp_path.glob("*.csv.gz"))


def test_the_consumer_guide_runs_against_the_public_bucket(public: Published, tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "reader"
    work.mkdir()
    outputs = _run_guide(public, work, home, lambda b: not b.needs_aws_cli)

    # What the shell blocks downloaded is what was published, byte for byte.
    day = DAYS[1]
    downloaded = {
        f"website_metrics_{day}.csv.gz": wm_key(day),
        f"watchlist_bbc_{day}.csv.gz": watchlists.object_key("bbc", day),
        f"website_metrics_daily_{day}.csv.gz": aggregates.daily_key(day),
        "website_metrics_monthly_2024-03.csv.gz": aggregates.monthly_key("2024-03"),
        "blocking_global.atom": GLOBAL_KEY,
        "watchlist_bbc.atom": watchlist_feed_key("bbc"),
        **{f"ooni/{parquet.parquet_key(d)}": parquet.parquet_key(d) for d in DAYS},
    }
    for local, key in downloaded.items():
        assert (work / local).read_bytes() == _object(public, key), local
    assert (work / f"website_metrics_{day}.csv").read_bytes() == gzip.decompress(
        _object(public, wm_key(day))
    )
    watchlist = gzip.decompress((work / f"watchlist_bbc_{day}.csv.gz").read_bytes()).decode()
    assert "www.bbc.com" in watchlist and "notbbc.com" not in watchlist

    by_kind = defaultdict(list)
    for block in guide_blocks():
        if block.line in outputs:
            by_kind[block.info].append(outputs[block.line])
    sync_output, pandas_output = by_kind["python"]
    assert sync_output.count("updated ooni/exports/parquet/website_metrics/day=") == 2
    # pandas: the day's counts per country, the month's categories per domain.
    assert re.search(r"IR\s+3\n", pandas_output), pandas_output
    for row in (
        r"IR\s+notbbc\.com",
        r" signal\.org\s+2\s+0\s+0\s+0\n",
        r" www\.signal\.org\s+0\s+1\s",
    ):
        assert re.search(row, pandas_output), (row, pandas_output)
    (clickhouse_output,) = by_kind["sql clickhouse"]
    assert clickhouse_output == (
        '"IR","signal.org",2,2,2\n"IR","www.signal.org",1,1,1\n"IT","signal.org",0,1,1\n'
    )

    # Run again: the manifest sync fetches nothing, nothing changed.
    again = _run_guide(public, work, home, lambda b: b.info == "python" and "manifest" in b.code)
    assert list(again.values()) == [""]


@pytest.mark.skipif(shutil.which("aws") is None, reason="the AWS CLI is not installed")
def test_the_aws_cli_block_runs_against_the_public_bucket(public: Published, tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    _run_guide(public, tmp_path, home, lambda b: b.needs_aws_cli)
    for day in DAYS:
        key = parquet.parquet_key(day)
        local = tmp_path / "parquet" / key.removeprefix("exports/parquet/")
        assert local.read_bytes() == _object(public, key)
