"""
A real PostgreSQL server for the tests: started once per session from Debian's server
binaries (C{apt-get install postgresql}), on a free loopback port, with its data and
socket in a temporary directory; one fresh database per test.

As root (CI), the server runs as the C{postgres} system user, since initdb and postgres
refuse to run as root.  Without the server binaries, or without psycopg, the tests that
need the server are skipped with a reason saying what to install.

Use: import the fixtures into a test module (C{from .pg import pg_server, pg_database})
and mark a test or a TestCase with C{@pytest.mark.usefixtures("pg_database")}; a
TestCase instance then has C{pg_url} and C{pg_server}.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

NOT_INSTALLED = "PostgreSQL server binaries not installed: apt-get install postgresql"
NO_PSYCOPG = "psycopg not installed: pip install 'psycopg[binary]' (or '.[test]')"
USER = "iapd"
START_TIMEOUT = 60.0


def _version(bindir: str) -> tuple[int, ...]:
    m = re.search(r"/postgresql/([\d.]+)/bin", bindir)
    return tuple(int(p) for p in m[1].split(".") if p) if m else (0,)


def find_bindir() -> Path | None:
    """The newest directory holding initdb and pg_ctl: $IAPD_TEST_PG_BINDIR, Debian's, PATH's."""
    candidates = []
    if os.environ.get("IAPD_TEST_PG_BINDIR"):
        candidates.append(os.environ["IAPD_TEST_PG_BINDIR"])
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        d = Path(candidate)
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory; C{start}, C{stop}, C{cleanup}."""

    def __init__(self, bindir: Path, fsync: bool = False) -> None:
        self.bindir = bindir
        self.fsync = fsync  # off for the tests (speed); on for bench/pg.py, as in production
        self.as_root = os.geteuid() == 0
        self.base = Path(tempfile.mkdtemp(prefix="iapd-pg-"))
        self.data = self.base / "data"
        self.sockets = self.base / "sockets"
        self.log = self.base / "server.log"
        self.port = free_port()
        self._cleaned = False
        self.sockets.mkdir()
        if self.as_root:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.base, ignore_errors=True)
                raise RuntimeError("running as root and there is no postgres user to run the server as") from None
            for path in (self.base, self.sockets):
                os.chown(path, account.pw_uid, account.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8", "--locale=C",
                  "--no-sync")

    # -- running the server's programs --------------------------------------------------

    def _command(self, program: str, *args: str) -> list[str]:
        argv = [str(self.bindir / program), *args]
        if not self.as_root:
            return argv
        if shutil.which("runuser"):
            return ["runuser", "-u", "postgres", "--", *argv]
        return ["su", "-s", "/bin/sh", "postgres", "-c", shlex.join(argv)]

    def _run(self, program: str, *args: str, timeout: float = 120.0, check: bool = True) -> int:
        # output to a file, never a pipe: the server pg_ctl starts inherits it and would
        # keep a pipe open for as long as it runs
        with open(self.base / f"{program}.out", "ab") as out:
            result = subprocess.run(
                self._command(program, *args), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.base, timeout=timeout,
            )
        if check and result.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} exited {result.returncode}:\n{self.output(program)}")
        return result.returncode

    def output(self, program: str = "pg_ctl") -> str:
        texts = []
        for path in (self.base / f"{program}.out", self.log):
            try:
                texts.append(path.read_text(errors="replace")[-4000:])
            except OSError:
                pass
        return "\n".join(texts)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start and wait (bounded) until it accepts connections."""
        for attempt in range(3):
            options = (f"-h 127.0.0.1 -p {self.port} -k {self.sockets} -c fsync={'on' if self.fsync else 'off'}"
                       " -c max_connections=100")
            code = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                             "-t", str(int(START_TIMEOUT)), "start", check=False)
            if code == 0:
                break
            if "could not bind" in self.output() or "Address already in use" in self.output():
                self.port = free_port()  # taken between free_port() and the bind: another one
                continue
            raise RuntimeError(f"PostgreSQL did not start:\n{self.output()}")
        else:
            raise RuntimeError(f"PostgreSQL did not start:\n{self.output()}")
        self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL accepts no connections after {timeout}s:\n{self.output()}")
                time.sleep(0.1)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False) == 0

    def stop(self, mode: str = "fast") -> None:
        """Stop; C{immediate} is a crash as far as the clients can tell."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        if self.data.exists():
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    # -- databases ---------------------------------------------------------------------

    def url(self, dbname: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        import psycopg

        name = f"iapd_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL server for the whole session, stopped and removed at its end."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip(NO_PSYCOPG)
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(NOT_INSTALLED)
    server = PostgresServer(bindir)
    atexit.register(server.cleanup)  # should the session end without its teardown
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    yield server
    server.cleanup()


@pytest.fixture
def pg_database(pg_server: PostgresServer, request: Any) -> Iterator[str]:
    """The URL of a fresh, empty database, dropped after the test."""
    pg_server.ensure_running()  # a test may have stopped it and failed before restarting
    name = pg_server.create_database()
    url = pg_server.url(name)
    if request.instance is not None:
        request.instance.pg_server = pg_server
        request.instance.pg_url = url
    yield url
    pg_server.ensure_running()
    pg_server.drop_database(name)
