"""A PostgreSQL server for the tests: the one CI promises, or a private cluster on 127.0.0.1.

Fixtures (loaded by tests/conftest.py; mark the tests using them ``@pytest.mark.postgres``):

``postgres_uri`` (session)
    The server's URI. ``JOBFLOW_CACHE_TEST_POSTGRES_URI`` when set (an unreachable server then
    fails the tests: CI promised one); otherwise a private cluster started for this pytest
    process (one per xdist worker) and stopped at the end; the tests are skipped, saying
    why, when PostgreSQL's server binaries are missing or the cluster cannot start.
``pg_table``
    A fresh table name (``jfc_<hex>``); its tables are dropped at teardown.
``make_pg_backend``
    Factory ``make_pg_backend(table=None, connect=True, **kwargs) -> PostgresBackend`` on a
    fresh table name (or the given one); backends are closed and tables dropped at teardown.
``pg_spec``
    ``{"type": "PostgresBackend", "uri": ..., "table": <pg_table>}`` for subprocesses and the
    CLI.
``pg_cluster``
    A private cluster of the test's own (:class:`PrivateCluster`) that the test may stop and
    start (fault injection); never the CI server, which other workers share.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobflow_cache.backends.postgres import PostgresBackend

__all__ = [
    "ENV_URI",
    "PrivateCluster",
    "make_pg_backend",
    "pg_cluster",
    "pg_spec",
    "pg_table",
    "postgres_uri",
]

logger = logging.getLogger(__name__)

ENV_URI = "JOBFLOW_CACHE_TEST_POSTGRES_URI"
INSTALL = "apt-get install postgresql"
#: Read at import (conftest loads this module first): the autouse isolated_cache fixture
#: removes every JOBFLOW_CACHE_* variable before a test asks for the server lazily.
_CI_URI = os.environ.get(ENV_URI)


class ClusterError(Exception):
    """A private cluster could not be made or started."""


def _version(path: str) -> tuple[int, ...]:
    found = re.search(r"/postgresql/([\d.]+)/", path)
    return tuple(int(p) for p in found.group(1).split(".")) if found else (0,)


def server_bindir() -> Path | None:
    """The newest folder holding ``initdb`` and ``pg_ctl`` (Debian layout, then PATH)."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True):
        if os.access(f"{folder}/initdb", os.X_OK) and os.access(f"{folder}/pg_ctl", os.X_OK):
            return Path(folder)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateCluster:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (trust authentication, no fsync).

    As root, it runs as the ``postgres`` user (PostgreSQL refuses root), in a folder that
    user owns. :meth:`start` and :meth:`stop` may be called again (the port stays).
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.prefix: list[str] = []
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError as err:
                raise ClusterError("running as root and there is no 'postgres' user") from err
            runuser = shutil.which("runuser")
            if runuser is None:
                raise ClusterError("running as root and runuser is missing")
            self.prefix = [runuser, "-u", "postgres", "--"]
        self.base = Path(tempfile.mkdtemp(prefix="jfc-pg-"))
        if owner is not None:
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = 0
        self.running = False
        self._initdb()

    @property
    def uri(self) -> str:
        """The URI of the superuser ``postgres`` on database ``postgres``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, *args],
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _initdb(self) -> None:
        initdb = str(self.bindir / "initdb")
        common = [initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        # an ICU collation where "Elder" > "apple": proves the store never relies on the
        # database's collation; plain C.UTF-8 where ICU is not available
        attempts = [
            [*common, "-N", "--locale=C.UTF-8", "--locale-provider=icu", "--icu-locale=en-US"],
            [*common, "-N", "--locale=C.UTF-8"],
            [*common, "-N", "--locale=C"],
        ]
        errors = []
        for args in attempts:
            shutil.rmtree(self.data, ignore_errors=True)
            proc = self._run(*args)
            if proc.returncode == 0:
                return
            errors.append(proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"])
        raise ClusterError(f"initdb failed: {errors[-1][0]}")

    def start(self) -> str:
        """Start the server (on a free port the first time); return its URI."""
        if self.running:
            return self.uri
        for _ in range(5):
            port = self.port or _free_port()
            options = (
                f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                "-c fsync=off -c full_page_writes=off "
                "-c max_connections=300 -c shared_buffers=32MB"
            )
            proc = self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            )
            if proc.returncode == 0:
                self.port = port
                self.running = True
                return self.uri
            if self.port:  # restarting on our own port: nothing else to try
                break
        tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
        raise ClusterError(f"pg_ctl start failed: {proc.stderr.strip()} {' | '.join(tail)}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate, as ``pg_ctl stop -m``)."""
        if not self.running:
            return
        proc = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "stop")
        if proc.returncode != 0:
            logger.warning("pg_ctl stop failed: %s", proc.stderr.strip())
        self.running = False

    def destroy(self) -> None:
        """Stop the server and delete the cluster."""
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


def _private_cluster() -> PrivateCluster:
    bindir = server_bindir()
    if bindir is None:
        pytest.skip(f"PostgreSQL server binaries not found (install them: {INSTALL})")
    try:
        cluster = PrivateCluster(bindir)
    except (ClusterError, OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot make a PostgreSQL test cluster: {err} (needs: {INSTALL})")
    try:
        cluster.start()
    except (ClusterError, OSError, subprocess.SubprocessError) as err:
        cluster.destroy()
        pytest.skip(f"cannot start a PostgreSQL test server: {err} (needs: {INSTALL})")
    atexit.register(cluster.destroy)  # also when the session is interrupted
    return cluster


def _psycopg() -> Any:
    return pytest.importorskip("psycopg", reason="psycopg missing: pip install -e '.[postgres]'")


@pytest.fixture(scope="session")
def postgres_uri() -> Iterator[str]:
    """The URI of a PostgreSQL server for this test session (see the module docstring)."""
    psycopg = _psycopg()
    uri = os.environ.get(ENV_URI) or _CI_URI
    if uri:
        try:
            psycopg.connect(uri, connect_timeout=5).close()
        except psycopg.Error as err:
            pytest.fail(f"{ENV_URI} is set but its server is unreachable: {err}")
        yield uri
        return
    cluster = _private_cluster()
    try:
        yield cluster.uri
    finally:
        cluster.destroy()


def drop_tables(uri: str, table: str) -> None:
    """Drop the cache's tables of ``table``: PostgresBackend's (``__v``, ``__e``, ``__p``,
    ``__c``), 0.1.0's PostgresStore's (the table itself), and their claims and aliases."""
    psycopg = _psycopg()
    tables = (
        table,
        f"{table}_claims",
        f"{table}_aliases",
        *(f"{table}__{suffix}" for suffix in ("v", "e", "p", "c")),
    )
    names = ", ".join('"' + name.replace('"', '""') + '"' for name in tables)
    try:
        with psycopg.connect(uri, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SET lock_timeout = '20s'")
            conn.execute(f"DROP TABLE IF EXISTS {names} CASCADE")
    except psycopg.Error as err:  # a test that stopped the server, say
        logger.warning("could not drop the test tables %s: %s", names, err)


def new_table_name() -> str:
    """A fresh table name."""
    return f"jfc_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def pg_table(postgres_uri: str) -> Iterator[str]:
    """A fresh table name; its tables are dropped at teardown."""
    name = new_table_name()
    yield name
    drop_tables(postgres_uri, name)


@pytest.fixture
def make_pg_backend(postgres_uri: str) -> Iterator[Callable[..., PostgresBackend]]:
    """Factory of PostgresBackends on fresh (or given) table names, closed and dropped at
    teardown."""
    made: list[PostgresBackend] = []
    tables: set[str] = set()

    def make(table: str | None = None, connect: bool = True, **kwargs: Any) -> PostgresBackend:
        table = table or new_table_name()
        tables.add(table)
        backend = PostgresBackend(postgres_uri, table=table, **kwargs)
        made.append(backend)
        if connect:
            backend.connect()
        return backend

    yield make
    for backend in made:
        backend.close()
    for table in tables:
        drop_tables(postgres_uri, table)


@pytest.fixture
def pg_spec(postgres_uri: str, pg_table: str) -> dict[str, Any]:
    """A store spec (``{"type": "PostgresBackend", ...}``) on a fresh table."""
    return {"type": "PostgresBackend", "uri": postgres_uri, "table": pg_table}


@pytest.fixture
def pg_cluster() -> Iterator[PrivateCluster]:
    """A private, running cluster the test may stop and start; destroyed at teardown."""
    _psycopg()
    cluster = _private_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()
