"""The shared test rig: real chdb, moto's S3 server on 127.0.0.1, an upstream HTTP
server with fault injection, and local git repositories.

chdb allows one data directory per process, so the whole session shares one; each
test starts from an empty database (all tables dropped).

ClickHouse runs on two back ends: ``embedded`` (chdb in-process, ``chdb://``) and
``server`` (the same engine behind a ClickHouse HTTP endpoint on 127.0.0.1, reached
through clickhouse-connect's HTTP client, as production reaches its server; its
tables live in database ``server`` of the same directory), and ``server-24.8``: the
endpoint in a process of its own in front of ClickHouse 24.8 (chdb 3.3.0, from
``.venv-ch24``), the release OONI's cluster runs. Tests that use the
``clickhouse`` fixture run on the back ends named by ``--clickhouse`` (or
``OONI_TEST_CLICKHOUSE``; default both), unless marked
``@pytest.mark.clickhouse_backends(...)``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from ooni_pipeline.clickhouse import ClickHouse, ClickHouseResource, quote_identifier
from ooni_pipeline.object_store import ObjectStoreResource
from ooni_pipeline_tests.clickhouse_http import ClickHouseHTTP, endpoint_url
from ooni_pipeline_tests.rig import GitRepo, UpstreamServer

SERVER_USER, SERVER_PASSWORD, SERVER_DATABASE = "ooni", "pw-never-in-errors-7f3a", "server"
BACKENDS = ("embedded", "server", "server-24.8")
DEFAULT_BACKENDS = ("embedded", "server", "server-24.8")
CH24_PYTHON = Path(__file__).resolve().parents[1] / ".venv-ch24" / "bin" / "python"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--clickhouse",
        default=os.environ.get("OONI_TEST_CLICKHOUSE", ",".join(DEFAULT_BACKENDS)),
        help="ClickHouse back ends for tests using the clickhouse fixture, "
        f"comma-separated, of {', '.join(BACKENDS)}",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "clickhouse_backends(*names): the ClickHouse back ends this test runs on"
    )
    config.addinivalue_line(
        "markers",
        "clickhouse_backends_except(*names, reason): the chosen back ends but these, and why",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "clickhouse_backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("clickhouse_backends")
    if marker is not None:
        names = tuple(marker.args)
    else:
        names = tuple(n.strip() for n in metafunc.config.getoption("clickhouse").split(","))
    excluded = metafunc.definition.get_closest_marker("clickhouse_backends_except")
    if excluded is not None:
        if not excluded.kwargs.get("reason"):
            raise pytest.UsageError("clickhouse_backends_except needs a reason")
        names = tuple(n for n in names if n not in excluded.args)
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise pytest.UsageError(f"unknown ClickHouse back end(s): {sorted(unknown)}")
    if names != ("embedded",):  # the default run keeps its test ids
        metafunc.parametrize("clickhouse_backend", names)


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb") / "clickhouse"


@pytest.fixture(scope="session")
def clickhouse_server(chdb_path: Path) -> Iterator[ClickHouseHTTP]:
    """A ClickHouse HTTP endpoint on 127.0.0.1 in front of the session's chdb directory."""
    import chdb

    conn = chdb.connect(str(chdb_path))
    try:
        conn.query(f"CREATE DATABASE IF NOT EXISTS {SERVER_DATABASE}", "TSV")
    finally:
        conn.close()
    server = ClickHouseHTTP(str(chdb_path), {SERVER_USER: SERVER_PASSWORD})
    yield server
    server.close()


class ClickHouse24:
    """The endpoint in front of ClickHouse 24.8, in a process of its own (see
    ``clickhouse_http.serve``); it ends when the session does."""

    def __init__(self, path: Path):
        if not CH24_PYTHON.exists():
            pytest.fail(f"{CH24_PYTHON} is missing: `make .venv-ch24` makes it (make test does)")
        env = dict(os.environ, PYTHONPATH=str(CH24_PYTHON.parents[2]))
        env["CHDB_HTTP_USERS"] = json.dumps({SERVER_USER: SERVER_PASSWORD})
        self.process = subprocess.Popen(
            [str(CH24_PYTHON), "-m", "ooni_pipeline_tests.clickhouse_http", str(path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        first = self.process.stdout.readline().decode().split()
        if len(first) != 2:
            self.process.kill()
            pytest.fail(f"the ClickHouse 24.8 endpoint did not start (exit {self.process.wait()})")
        self.port, self.version = int(first[0]), first[1]
        with ClickHouse(self.url(SERVER_USER, SERVER_PASSWORD, "default")) as ch:
            ch.command(f"CREATE DATABASE IF NOT EXISTS {SERVER_DATABASE}")

    def url(self, user: str, password: str, database: str = "default") -> str:
        return endpoint_url(self.port, user, password, database)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="session")
def clickhouse_server_24(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouse24]:
    server = ClickHouse24(tmp_path_factory.mktemp("chdb-24.8") / "clickhouse")
    yield server
    server.close()


@pytest.fixture
def clickhouse_backend() -> str:
    """``embedded`` or ``server``; parametrized by ``pytest_generate_tests``."""
    return "embedded"


@pytest.fixture
def clickhouse(
    request: pytest.FixtureRequest, chdb_path: Path, clickhouse_backend: str
) -> ClickHouseResource:
    """The resource on the chosen back end, its database emptied for this test."""
    if clickhouse_backend == "server":
        server: ClickHouseHTTP = request.getfixturevalue("clickhouse_server")
        server.keep_engine()
        request.addfinalizer(server.release_engine)
        url = server.url(SERVER_USER, SERVER_PASSWORD, SERVER_DATABASE)
    elif clickhouse_backend == "server-24.8":
        url = request.getfixturevalue("clickhouse_server_24").url(
            SERVER_USER, SERVER_PASSWORD, SERVER_DATABASE
        )
    else:
        url = f"chdb://{chdb_path}"
    resource = ClickHouseResource(url=url, lock_timeout_s=60)
    with resource.connect() as ch:
        for (table,) in ch.query_rows(
            "SELECT name FROM system.tables WHERE database = currentDatabase()"
        ):
            ch.command(f"DROP TABLE IF EXISTS {quote_identifier(table)} SYNC")
        if clickhouse_backend != "embedded":
            # A deployed server has OONI's tables, created by OONI with its own DDL and
            # the operator's additions (docs/clickhouse.md, "Tables the operator owns").
            create_operator_tables(ch)
    return resource


OONI_DDL = Path(__file__).parent / "data" / "ooni_ddl.sql"


def operator_ddl(additions: bool = True) -> dict[str, str]:
    """table -> the CREATE TABLE statement OONI's operator used for it; without
    ``additions``, OONI's own (docs/Database.md: no operator line, no newer column)."""
    statements = {}
    for statement in OONI_DDL.read_text().split(";"):
        body = "\n".join(
            line
            for line in statement.splitlines()
            if not line.lstrip().startswith("--")
            and (additions or not ("-- operator" in line or "-- newer" in line))
        ).strip()
        if body:
            statements[body.split()[2]] = body
    return statements


@pytest.fixture
def operator_tables(ch: ClickHouse, clickhouse_backend: str):
    """The operator's tables exist before the first run, on both back ends; returns a
    function giving each named table's ``SHOW CREATE TABLE``."""
    if clickhouse_backend == "embedded":
        create_operator_tables(ch)

    def definitions(*names: str) -> dict[str, str]:
        return {n: ch.scalar(f"SHOW CREATE TABLE {quote_identifier(n)}") for n in names}

    return definitions


def create_operator_tables(ch: ClickHouse, *names: str) -> None:
    """Create OONI's tables (all, or ``names``) as OONI's operator did."""
    ddl = operator_ddl()
    for name in names or tuple(ddl):
        ch.command(ddl[name])


@pytest.fixture
def ch(clickhouse: ClickHouseResource) -> Iterator[ClickHouse]:
    with clickhouse.connect() as connection:
        yield connection


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto in server mode: a real S3 endpoint over HTTP on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    name = f"ooni-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(
        Bucket=name
    )
    return name


@pytest.fixture
def s3_client(moto_endpoint: str):
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")


@pytest.fixture
def s3_store_resource(moto_endpoint: str, s3_bucket: str) -> ObjectStoreResource:
    return ObjectStoreResource(
        bucket=s3_bucket, endpoint_url=moto_endpoint, region_name="us-east-1", part_size_mb=5
    )


@pytest.fixture
def local_store_resource(tmp_path: Path) -> ObjectStoreResource:
    return ObjectStoreResource(local_dir=str(tmp_path / "objects"))


@pytest.fixture(params=["local", "s3"])
def object_store_resource(request: pytest.FixtureRequest) -> ObjectStoreResource:
    """Both object stores, one after the other."""
    if request.param == "local":
        return request.getfixturevalue("local_store_resource")
    return request.getfixturevalue("s3_store_resource")


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer()
    yield server
    server.close()


@pytest.fixture
def git_repo(tmp_path: Path) -> GitRepo:
    return GitRepo(tmp_path / "upstream-repo")
