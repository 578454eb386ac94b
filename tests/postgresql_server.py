"""Pytest plugin: a real, throwaway PostgreSQL server for the test session.

Fixtures
--------
``postgresql_server`` (session)
    The running :class:`PostgreSQLServer` (port, version, helpers).
``postgresql_url`` (session)
    SQLAlchemy URL of the database ``gateway_test`` on that server,
    ``postgresql+psycopg://postgres@127.0.0.1:PORT/gateway_test``.
``postgresql_create_database`` (function)
    Factory: each call creates a new, uniquely named database and returns its URL; all of
    them are dropped after the test.
``postgresql_fresh_url`` (function)
    URL of a new database of its own for one test, dropped afterwards.

The server is started with the Debian binaries (``/usr/lib/postgresql/*/bin``; the
``GATEWAY_POSTGRESQL_BINDIR`` environment variable overrides the search) in a new temporary
directory, listens on 127.0.0.1 only, on a free port, with durability switched off for
speed, and is stopped and removed at the end of the session. As root, it runs as the
``postgres`` system user (PostgreSQL refuses to run as root).

Without PostgreSQL installed the tests that need it are skipped, except when the ``CI``
environment variable is set or ``GATEWAY_REQUIRE_POSTGRESQL=1``: then they fail, since CI
must really test against PostgreSQL. Tests using these fixtures are marked ``postgresql``.

Registered by ``pytest_plugins = ["tests.postgresql_server"]`` in ``tests/conftest.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

DATABASE = "gateway_test"
SUPERUSER = "postgres"
START_TIMEOUT = 30  # seconds, for `pg_ctl start -w`
STOP_TIMEOUT = 30  # seconds, for `pg_ctl stop -w`
COMMAND_TIMEOUT = 120  # seconds, for any other server command (initdb)
START_ATTEMPTS = 3  # a fresh free port per attempt, should another process take ours

FIXTURES = frozenset({"postgresql_server", "postgresql_url", "postgresql_create_database", "postgresql_fresh_url"})

_SERVER_KEY = pytest.StashKey["PostgreSQLServer"]()


class PostgreSQLUnavailable(Exception):
    """PostgreSQL (or psycopg) is not installed: skip, or fail where it is required."""


class PostgreSQLServerError(Exception):
    """The server could not be set up, started or used."""


def postgresql_required() -> bool:
    """Whether a missing PostgreSQL must fail the tests instead of skipping them."""
    if os.environ.get("GATEWAY_REQUIRE_POSTGRESQL", "") == "1":
        return True
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_bindir() -> Path | None:
    """The directory with ``initdb`` and ``pg_ctl``: newest Debian version first."""
    override = os.environ.get("GATEWAY_POSTGRESQL_BINDIR")
    if override:
        bindir = Path(override)
        return bindir if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file() else None

    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))

    candidates = [
        initdb.parent
        for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb")
        if (initdb.parent / "pg_ctl").is_file()
    ]
    if candidates:
        return max(candidates, key=version)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl", path=str(Path(initdb).parent)):
        return Path(initdb).parent
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class PostgreSQLServer:
    """One throwaway PostgreSQL cluster in a temporary directory."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = 0
        self.version = ""
        self.initdb_seconds = 0.0
        self.start_seconds = 0.0
        self.base: Path | None = None
        self._run_as: list[str] = []
        self._owner: pwd.struct_passwd | None = None
        self._stopped = False
        self._env = {key: val for key, val in os.environ.items() if not key.startswith("PG")}
        self._env.update(LC_ALL="C", LANG="C")

    # -- paths --------------------------------------------------------------------------

    @property
    def datadir(self) -> Path:
        assert self.base is not None
        return self.base / "data"

    @property
    def socketdir(self) -> Path:
        assert self.base is not None
        return self.base / "run"

    @property
    def logfile(self) -> Path:
        assert self.base is not None
        return self.base / "postgresql.log"

    def url(self, database: str = DATABASE) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of ``database`` on this server."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        atexit.register(self.stop)  # fallback should the fixture's finalizer not run
        self._make_base()
        began = time.monotonic()
        self._initdb()
        self.initdb_seconds = time.monotonic() - began

        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            began = time.monotonic()
            result = self._run(
                [
                    str(self.bindir / "pg_ctl"),
                    "start",
                    "--wait",
                    f"--timeout={START_TIMEOUT}",
                    "--pgdata",
                    str(self.datadir),
                    "--log",
                    str(self.logfile),
                    "-o",
                    f"-p {self.port}",
                ],
                timeout=START_TIMEOUT + 10,
                check=False,
            )
            if result.returncode == 0:
                self.start_seconds = time.monotonic() - began
                break
            log = _tail(self.logfile)
            self._kill_postmaster()
            if attempt == START_ATTEMPTS or "could not bind" not in log:
                raise PostgreSQLServerError(
                    f"PostgreSQL did not start within {START_TIMEOUT} s "
                    f"(pg_ctl exit {result.returncode}):\n{result.stdout}\n"
                    f"--- {self.logfile} ---\n{log}"
                )

        with self.connect() as conn:
            self.version = str(conn.execute("SHOW server_version").fetchone()[0])
            self.create_database(DATABASE, conn=conn)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory; safe to call again."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)
        if self.base is None:
            return
        try:
            if (self.datadir / "postmaster.pid").exists():
                try:
                    self._run(
                        [
                            str(self.bindir / "pg_ctl"),
                            "stop",
                            "--wait",
                            f"--timeout={STOP_TIMEOUT}",
                            "--mode=fast",
                            "--pgdata",
                            str(self.datadir),
                        ],
                        timeout=STOP_TIMEOUT + 10,
                    )
                except (OSError, subprocess.SubprocessError, PostgreSQLServerError):
                    self._kill_postmaster()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- databases ----------------------------------------------------------------------

    def connect(self, database: str = "postgres") -> Any:
        """An autocommit psycopg connection as the superuser."""
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            dbname=database,
            autocommit=True,
            connect_timeout=10,
        )

    def create_database(self, name: str, conn: Any = None) -> str:
        """Create database ``name``; return its SQLAlchemy URL."""
        from psycopg import sql

        with contextlib.ExitStack() as stack:
            if conn is None:
                conn = stack.enter_context(self.connect())
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, first ending every session still connected to it."""
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            force = sql.SQL(" WITH (FORCE)") if conn.info.server_version >= 130000 else sql.SQL("")
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}{}").format(sql.Identifier(name), force))

    # -- helpers ------------------------------------------------------------------------

    def _make_base(self) -> None:
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: run it as the `postgres` system user, in a
            # directory of its own under /tmp (which that user can traverse, unlike $TMPDIR
            # perhaps, e.g. under /root).
            try:
                self._owner = pwd.getpwnam(SUPERUSER)
            except KeyError:
                raise PostgreSQLServerError(
                    f"running as root, but there is no {SUPERUSER!r} system user to run "
                    "PostgreSQL as (install Debian's postgresql package)"
                ) from None
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PostgreSQLServerError("running as root, but runuser(1) is not installed")
            self._run_as = [runuser, "-u", SUPERUSER, "--"]
            self.base = Path(tempfile.mkdtemp(prefix="gateway-pg-", dir="/tmp"))
            os.chmod(self.base, 0o755)
            os.chown(self.base, self._owner.pw_uid, self._owner.pw_gid)
        else:
            self.base = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        self.socketdir.mkdir(mode=0o700)
        if self._owner is not None:
            os.chown(self.socketdir, self._owner.pw_uid, self._owner.pw_gid)

    def _initdb(self) -> None:
        self._run(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(self.datadir),
                f"--username={SUPERUSER}",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout=COMMAND_TIMEOUT,
        )
        socketdir = str(self.socketdir).replace("'", "''")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{socketdir}'",
            "max_connections": "200",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        with (self.datadir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# gateway test server (tests/postgresql_server.py)\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        (self.datadir / "pg_hba.conf").write_text(
            "# gateway test server: trusted, local and 127.0.0.1 only\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n",
            encoding="utf-8",
        )

    def _run(self, argv: list[str], *, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.base is not None
        result = subprocess.run(
            [*self._run_as, *argv],
            cwd=self.base,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            # The postmaster leaves with pg_ctl's session: keep it out of pytest's, so that
            # a Ctrl-C reaches pytest alone and the fixture shuts the server down in order.
            start_new_session=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise PostgreSQLServerError(f"{Path(argv[0]).name} failed (exit {result.returncode}):\n{result.stdout}")
        return result

    def _kill_postmaster(self) -> None:
        """Last resort: immediate shutdown via the pid in postmaster.pid."""
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _unavailable_reason() -> str | None:
    if find_bindir() is None:
        where = os.environ.get("GATEWAY_POSTGRESQL_BINDIR") or "/usr/lib/postgresql/*/bin"
        return (
            f"PostgreSQL server binaries not found (no initdb and pg_ctl in {where}); "
            "install them with `bash scripts/bootstrap.sh --test` "
            "(Debian package postgresql)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return 'psycopg is not installed: `pip install -e ".[test]"`'
    return None


@pytest.fixture(scope="session")
def postgresql_server(request: pytest.FixtureRequest) -> Iterator[PostgreSQLServer]:
    """A running throwaway PostgreSQL server, stopped and removed after the session."""
    reason = _unavailable_reason()
    if reason is not None:
        if postgresql_required():
            pytest.fail(
                f"{reason}. PostgreSQL is required here (CI is set or "
                "GATEWAY_REQUIRE_POSTGRESQL=1), so this is a failure, not a skip.",
                pytrace=False,
            )
        pytest.skip(reason)

    bindir = find_bindir()
    assert bindir is not None
    server = PostgreSQLServer(bindir)
    try:
        try:
            server.start()
        except (OSError, subprocess.SubprocessError, PostgreSQLServerError) as exc:
            pytest.fail(f"could not start the PostgreSQL test server: {exc}", pytrace=False)
        request.config.stash[_SERVER_KEY] = server
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgresql_url(postgresql_server: PostgreSQLServer) -> str:
    """SQLAlchemy URL of the session's ``gateway_test`` database."""
    return postgresql_server.url(DATABASE)


@pytest.fixture
def postgresql_create_database(
    postgresql_server: PostgreSQLServer,
) -> Iterator[Callable[[], str]]:
    """Factory of new, uniquely named databases (URLs), all dropped after the test."""
    created: list[str] = []

    def create() -> str:
        name = f"gateway_test_{uuid.uuid4().hex[:16]}"
        url = postgresql_server.create_database(name)
        created.append(name)
        return url

    try:
        yield create
    finally:
        for name in reversed(created):
            postgresql_server.drop_database(name)


@pytest.fixture
def postgresql_fresh_url(postgresql_create_database: Callable[[], str]) -> str:
    """SQLAlchemy URL of a new database of this test's own, dropped afterwards."""
    return postgresql_create_database()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgresql)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    server = config.stash.get(_SERVER_KEY, None)
    if server is None:
        return
    terminalreporter.write_line(
        f"PostgreSQL {server.version} test server on 127.0.0.1:{server.port}: "
        f"initdb {server.initdb_seconds:.2f} s, start {server.start_seconds:.2f} s"
    )
