"""One ``backend`` fixture over every :class:`~jobflow_cache.backends.base.EntryBackend`.

Parameters (test ids):

``sqlite``
    :class:`~jobflow_cache.backends.sqlite.SQLiteBackend` on ``tmp_path / "cache.sqlite"``.
``memory``
    :class:`~jobflow_cache.backends.maggma.MaggmaBackend` over maggma's ``MemoryStore``.
``mongo``
    ``MaggmaBackend`` over maggma's own ``MongoStore`` class (its real ``connect``/``close``/
    ``name``, and the claims collections beside it). On the MongoDB server named by
    ``JOBFLOW_CACHE_TEST_MONGODB_URI`` when it is set (a fresh collection, dropped after);
    otherwise on a substitute, marked ``@pytest.mark.substitute``: no MongoDB server can exist
    on this machine, so the store's client is mongomock, the library maggma's
    ``MemoryStore`` runs on (tests/test_mongo.py's substitute is a ``MemoryStore``; here the
    ``MongoStore`` class itself runs, so the ``memory`` and ``mongo`` cases differ): every
    client the store makes reaches one in-memory "server" per test.
``pgbackend``
    :class:`~jobflow_cache.backends.postgres.PostgresBackend` on fresh tables of the test
    server (tests/support/pgserver.py; skipped, saying why, when no server can run), marked
    ``@pytest.mark.postgres``.

Each backend is connected before the test and closed after it.

Fixtures: ``backend_kind`` (the id above), ``backend``, ``owned_file`` (the file a file
backend keeps, else None), ``reopen`` (connects another backend on the same storage, as
another process would) and ``reopen_after_close`` (the same, for a storage that outlives its
connections).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobflow_cache.backends.base import EntryBackend

#: Read at import: the autouse ``isolated_cache`` fixture removes every JOBFLOW_CACHE_*
#: variable before a test runs.
MONGODB_URI = os.environ.get("JOBFLOW_CACHE_TEST_MONGODB_URI", "")

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("memory", id="memory"),
    pytest.param(
        "mongo",
        id="mongo",
        # SUBSTITUTE (without a server URI): mongomock stands in for a MongoDB server, which
        # cannot exist on this machine
        marks=() if MONGODB_URI else pytest.mark.substitute,
    ),
    pytest.param("pgbackend", id="pgbackend", marks=pytest.mark.postgres),
]

#: Kinds that keep files of their own (``owned_paths()`` non-empty), and the file they keep.
_FILES = {"sqlite": "cache.sqlite"}


def _unique() -> str:
    return f"jfc_{uuid.uuid4().hex[:12]}"


def _mongo_opener(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], Any]:
    """Opens MongoStores on one fresh collection: of the server when there is one."""
    from maggma.stores import MongoStore

    collection = _unique()
    if MONGODB_URI:
        from pymongo import uri_parser

        database = uri_parser.parse_uri(MONGODB_URI).get("database") or "jobflow_cache_test"
        request.addfinalizer(lambda: _drop_mongo(collection))  # after the backend closes
        return lambda: MongoStore(database, collection, uri=MONGODB_URI)
    # SUBSTITUTE: a MongoStore whose client is mongomock (maggma's MemoryStore client), for
    # a MongoDB server that cannot exist here; the patch lasts until after the backend closes
    import maggma.stores.mongolike as mongolike

    mongomock = mongolike.mongomock
    server = mongomock.store.ServerStore()  # one "server": every new client reaches it
    monkeypatch.setattr(
        mongolike, "MongoClient", lambda *a, **k: mongomock.MongoClient(_store=server)
    )
    return lambda: MongoStore("jobflow_cache_test", collection)


def _drop_mongo(collection: str) -> None:
    """Drop a test's collections (entries, claims, aliases) from the real server."""
    from pymongo import MongoClient, uri_parser

    client: Any = MongoClient(MONGODB_URI, serverSelectionTimeoutMS=5000)
    try:
        db = client[uri_parser.parse_uri(MONGODB_URI).get("database") or "jobflow_cache_test"]
        for name in db.list_collection_names():
            if name == collection or name.startswith(collection + "_"):
                db.drop_collection(name)
    finally:
        client.close()


def backend_opener(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[Callable[[], EntryBackend], str]:
    """Opens new, unconnected backends of ``kind`` on one storage (see the module docstring),
    and what two of them share: ``"durable"`` (the entries, also once all are closed),
    ``"live"`` (the entries while one is connected: mongomock's "server" is wiped when a
    client closes) or ``"none"`` (a MemoryStore keeps its entries in the store object).
    """
    if kind == "sqlite":
        from jobflow_cache.backends.sqlite import SQLiteBackend

        return lambda: SQLiteBackend(tmp_path / "cache.sqlite"), "durable"

    from maggma.stores import MemoryStore

    from jobflow_cache.backends.maggma import MaggmaBackend

    if kind == "memory":
        collection = _unique()
        return lambda: MaggmaBackend(MemoryStore(collection_name=collection)), "none"
    if kind == "mongo":
        open_store = _mongo_opener(request, monkeypatch)
        return lambda: MaggmaBackend(open_store()), "durable" if MONGODB_URI else "live"
    if kind == "pgbackend":
        from jobflow_cache.backends.postgres import PostgresBackend
        from tests.support.pgserver import new_table_name

        # tests/support/pgserver.py: skips when no server can run; the tables are dropped at
        # teardown
        uri = request.getfixturevalue("postgres_uri")
        table = new_table_name()
        request.addfinalizer(lambda: drop_backend_tables(uri, table))  # after the backend closes
        return lambda: PostgresBackend(uri, table=table), "durable"
    raise ValueError(f"unknown backend kind {kind!r}")


def drop_backend_tables(uri: str, table: str) -> None:
    """Drop a PostgresBackend's tables (and 0.1.0's PostgresStore's of the same name)."""
    from tests.support.pgserver import drop_tables

    drop_tables(uri, table)


@pytest.fixture(params=BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    """Which backend the test runs on (the test id)."""
    return str(request.param)


@pytest.fixture
def _opener(
    backend_kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Callable[[], EntryBackend], str]:
    return backend_opener(backend_kind, tmp_path, request, monkeypatch)


@pytest.fixture
def backend(_opener: tuple[Callable[[], EntryBackend], str]) -> Iterator[EntryBackend]:
    """A connected backend of ``backend_kind``, empty; closed after the test."""
    made = _opener[0]()
    made.connect()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def reopen(
    backend: EntryBackend, _opener: tuple[Callable[[], EntryBackend], str], backend_kind: str
) -> Iterator[Callable[[], EntryBackend]]:
    """Connects another backend on the storage of ``backend`` (as another process would),
    closed after the test; skips for a MemoryStore (its entries live in the store object)."""
    open_backend, sharing = _opener
    if sharing == "none":
        pytest.skip(f"{backend_kind}: a MemoryStore's entries live in the store object itself")
    made: list[EntryBackend] = []

    def connect() -> EntryBackend:
        other = open_backend()
        made.append(other)
        other.connect()
        return other

    yield connect
    for other in reversed(made):
        other.close()


@pytest.fixture
def reopen_after_close(
    reopen: Callable[[], EntryBackend],
    _opener: tuple[Callable[[], EntryBackend], str],
    backend_kind: str,
) -> Callable[[], EntryBackend]:
    """:func:`reopen`, for a storage that keeps the entries once every connection closed;
    skips for the mongomock substitute (closing a mongomock client wipes its "server")."""
    if _opener[1] != "durable":
        pytest.skip(f"{backend_kind}: closing a mongomock client wipes its in-memory server")
    return reopen


@pytest.fixture
def owned_file(backend_kind: str, tmp_path: Path) -> Path | None:
    """The file the backend keeps its entries in, None for a server's (or memory's)."""
    name = _FILES.get(backend_kind)
    return None if name is None else tmp_path / name
