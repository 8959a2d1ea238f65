"""What every ``cachetool`` command shares: the store it opens (``--store`` specs, friendly
errors when a server is unreachable or a file holds no cache), the group that turns errors into
one line, and the options and parameter types of the selection filters."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
from maggma.stores import MemoryStore
from monty.serialization import loadfn

from jobflow_cache.admin.listing import (
    Filters,
    parse_age,
)
from jobflow_cache.backends.sqlite import SQLiteBackend, keeps_old_entries
from jobflow_cache.cli import output as fmt
from jobflow_cache.errors import CacheError, StoreUnavailableError
from jobflow_cache.settings import CacheSettings, get_settings
from jobflow_cache.store import CacheStore

__all__ = [
    "CONNECT_TIMEOUT",
    "PREFIX",
    "STORE_HELP",
    "Age",
    "Group",
    "Prefix",
    "State",
    "When",
    "any_filter",
    "common_options",
    "criteria_of",
    "current_state",
    "filter_options",
    "first_line",
    "json_option",
    "load_spec",
    "open_cache",
]

#: Seconds a database server may take to answer before cachetool gives up on it.
CONNECT_TIMEOUT = 2.0


# --------------------------------------------------------------------------- opening the store


def _mongo_uri_spec(uri: str) -> dict[str, Any]:
    database = urlsplit(uri).path.lstrip("/") or "jobflow_cache"
    return {
        "type": "MongoStore",
        "uri": uri,
        "database": database,
        "collection_name": "entries",
    }


def load_spec(text: str) -> Any:
    """A store spec given on the command line: a ``mongodb://`` or ``postgresql://`` URI,
    inline JSON (``{...}``), or a YAML/JSON file holding a spec or a settings file's
    ``STORE:`` key."""
    stripped = text.strip()
    if stripped.startswith(("mongodb://", "mongodb+srv://")):
        return _mongo_uri_spec(stripped)
    if stripped.startswith(("postgresql://", "postgres://")):
        return {"type": "PostgresBackend", "uri": stripped}
    if stripped.startswith("{"):
        try:
            return _unwrap(json.loads(stripped))
        except json.JSONDecodeError as err:
            raise StoreUnavailableError(f"malformed store spec (not JSON): {err}") from err
    path = Path(stripped).expanduser()
    if not path.is_file():
        raise StoreUnavailableError(
            f"store spec file {path} does not exist (--store takes a file, inline JSON, "
            "or a mongodb:// or postgresql:// URI)"
        )
    try:
        loaded = loadfn(path)
    except Exception as err:
        raise StoreUnavailableError(f"malformed store spec file {path}: {err}") from err
    return _unwrap(loaded)


def _unwrap(spec: Any) -> Any:
    """The store spec of a settings file (``STORE:`` with the spec under it), else ``spec``."""
    if isinstance(spec, dict) and "@class" not in spec and "type" not in spec:
        for key, value in spec.items():
            if str(key).upper() == "STORE":
                return load_spec(value) if isinstance(value, str) else value
    return spec


def _with_timeouts(spec: Any) -> Any:
    """A spec whose database server is given up on after :data:`CONNECT_TIMEOUT`."""
    if not isinstance(spec, dict):
        return spec
    spec = dict(spec)
    kind = str(spec.get("type") or spec.get("@class") or "")
    if kind in ("MongoStore", "MongoURIStore", "GridFSStore"):
        kwargs = dict(spec.get("mongoclient_kwargs") or {})
        ms = int(CONNECT_TIMEOUT * 1000)
        kwargs.setdefault("serverSelectionTimeoutMS", ms)
        kwargs.setdefault("connectTimeoutMS", ms)
        spec["mongoclient_kwargs"] = kwargs
    elif kind in ("PostgresBackend", "PostgresStore"):  # PostgresStore: an earlier release's
        spec.setdefault("connect_timeout", CONNECT_TIMEOUT)
    return spec


def _sqlite_tables(path: str) -> dict[str, int] | None:
    """Row counts of the document tables of an SQLite file (None if it is no database)."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            names = [
                row[0]
                for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                if not row[0].startswith(("sqlite_", "jobflow_cache_"))
                and not row[0].endswith(("_claims", "_aliases"))
            ]
            return {
                name: db.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0] for name in names
            }
    except sqlite3.Error:
        return None


def _kept_by_sqlitestore(path: str, table: str) -> bool:
    """Whether ``table`` of the SQLite file is a collection 0.1.0's SQLiteStore kept entries
    in (read only: the file is not changed)."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return keeps_old_entries(db, table)
    except sqlite3.Error:
        return False


def _unreachable(cache: CacheStore, err: BaseException) -> StoreUnavailableError:
    """One line for a store that cannot be reached: the server, and what to check."""
    store = cache.store
    kind = type(store).__name__
    if kind in ("MongoStore", "MongoURIStore"):
        uri = getattr(store, "uri", None)
        where = (
            urlsplit(uri).netloc.rpartition("@")[2]
            if uri
            else f"{getattr(store, 'host', '?')}:{getattr(store, 'port', '?')}"
        )
        return StoreUnavailableError(
            f"cannot reach MongoDB at {where} within {CONNECT_TIMEOUT:.0f} s: check that the "
            "server runs and is reachable from here, and the host, port and credentials of "
            "the store spec"
        )
    if kind == "PostgresBackend":
        parts = urlsplit(str(getattr(store, "uri", "")))
        where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
        reason = first_line(err).rpartition(": ")[2]
        return StoreUnavailableError(
            f"cannot reach PostgreSQL at {where} ({reason}): check that the server runs and "
            "is reachable from here, and the host, port, database and credentials of the URI"
        )
    return StoreUnavailableError(first_line(err))


class State:
    """What the group's options set up: the cache store is opened on first use, never made."""

    def __init__(self, store: str | None, objects_dir: str | None, debug: bool) -> None:
        self.spec = store
        self.objects_dir = objects_dir
        self.debug = debug
        self._cache: CacheStore | None = None
        #: why the store shown is empty and not the one configured (None: it is that one)
        self.missing: str | None = None
        self.location = ""

    def settings(self) -> CacheSettings:
        return get_settings()

    def cache(self) -> CacheStore:
        """The connected cache store (closed when the command ends)."""
        if self._cache is not None:
            return self._cache
        settings = self.settings()
        spec = load_spec(self.spec) if self.spec is not None else settings.STORE
        if isinstance(spec, str):
            spec = load_spec(spec)
        if spec:
            settings = settings.model_copy(update={"STORE": _with_timeouts(spec)})
        cache = CacheStore.from_settings(settings)
        if self.objects_dir is not None:
            cache.objects_dir = str(Path(self.objects_dir).expanduser())
        self.location = cache.name
        self.missing = self._missing_table(cache)
        if self.missing is not None:  # nothing to read: an empty stand-in, nothing created
            fmt.note(self.missing)
            cache = CacheStore(MemoryStore(collection_name="empty"), cache.objects_dir)
        try:
            cache.connect()
        except StoreUnavailableError as err:
            raise _unreachable(cache, err.__cause__ or err) from err
        click.get_current_context().call_on_close(cache.close)
        self._cache = cache
        return cache

    @staticmethod
    def _missing_table(cache: CacheStore) -> str | None:
        if not isinstance(cache.backend, SQLiteBackend):
            return None
        # its own table, or that of an earlier release's file (migrated when opened)
        path, tables_wanted = cache.backend.path, ["jfc_entries", "entries"]
        if not os.path.exists(path):
            return f"No cache at {path} yet: nothing has been cached there."
        tables = _sqlite_tables(path)
        if tables is None or any(name in tables for name in tables_wanted):
            return None
        if "cache" in tables and _kept_by_sqlitestore(path, "cache"):
            return None  # 0.1.0's SQLiteStore default table, migrated when opened
        others = ", ".join(f"{n} ({fmt.plural(c, 'row')})" for n, c in tables.items()) or "none"
        return (
            f"{path} has no table {tables_wanted[0]!r}: nothing cached there "
            f"(its tables: {others}; the embedded store's is 'jfc_entries')."
        )


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class Group(click.Group):
    """A click group that turns cache and OS errors into one line on stderr (exit 1), and
    Ctrl-C into ``Interrupted`` (exit 130); a closed pipe (``| head``) ends it quietly."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except (CacheError, OSError) as err:
            state = ctx.obj if isinstance(ctx.obj, State) else None
            if state is not None and state.debug:
                raise
            raise click.ClickException(first_line(err)) from err


def current_state() -> State:
    return click.get_current_context().find_object(State) or State(None, None, False)


def open_cache() -> CacheStore:
    return current_state().cache()


class When(click.ParamType):
    """A date/time (``2025-01-31``, ``2025-01-31T12:00``; local time) or an age (``3d``)."""

    name = "WHEN"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            return datetime.now(timezone.utc) - parse_age(value)
        except ValueError:
            pass
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is neither a date (2025-01-31) nor an age (3d, 12h)", param, ctx)
        return when if when.tzinfo else when.astimezone()


class Age(click.ParamType):
    name = "AGE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return parse_age(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class Prefix(click.ParamType):
    name = "DIGEST"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value).strip().lower()
        if not (4 <= len(text) <= 32 and all(c in "0123456789abcdef" for c in text)):
            self.fail(f"{value!r} is not a digest prefix (4 to 32 hex digits)", param, ctx)
        return text


PREFIX = Prefix()

STORE_HELP = (
    "Cache store: a YAML/JSON file (a maggma spec like jobflow's JOB_STORE, or a settings "
    "file with STORE:), inline JSON, or a mongodb:// or postgresql:// URI. Default: "
    "JOBFLOW_CACHE_STORE / the settings file / the embedded SQLite store."
)


def _set_store(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        state = ctx.find_object(State)
        if state is not None:
            state.spec = value


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--store`` after the command too (``cachetool ls --store X``)."""
    return click.option(
        "--store",
        metavar="SPEC",
        expose_value=False,
        is_eager=True,
        callback=_set_store,
        help=STORE_HELP,
    )(func)


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The selection options shared by ls, purge, verify and stats."""
    options = [
        click.option("--name", help="Job name or Maker class, or a glob such as 'relax*'."),
        click.option(
            "--function",
            help="Function path module:qualname or the Maker's class path, or a glob "
            "('*EmtRelaxMaker*').",
        ),
        click.option("--since", type=When(), help="Created at or after (date or age: 7d)."),
        click.option("--before", type=When(), help="Created before (date or age: 30d)."),
        click.option("--invalid", is_flag=True, help="Only entries marked invalid."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def criteria_of(
    name: str | None,
    function: str | None,
    since: datetime | None,
    before: datetime | None,
    invalid: bool,
    **more: Any,
) -> dict[str, Any]:
    """The maggma criteria of the filter options: ``--name`` and ``--function`` also match
    the class of the Maker the entry's job was made by (``maker``)."""
    filters = Filters(
        name=name,
        function=function,
        since=since,
        before=before,
        invalid=True if invalid else None,
        **more,
    )
    criteria = filters.criteria()
    alternatives = []
    for field, value in (("name", name), ("function", function)):
        if value is not None:
            condition = criteria.pop(field)
            maker = value if ":" in value or "*" in value or "?" in value else f"*:{value}"
            maker_condition = Filters(function=maker).criteria()["function"]
            alternatives.append({"$or": [{field: condition}, {"maker": maker_condition}]})
    if not alternatives:
        return criteria
    parts = ([criteria] if criteria else []) + alternatives
    return parts[0] if len(parts) == 1 else {"$and": parts}


def any_filter(*values: Any) -> bool:
    return any(v not in (None, False, ()) for v in values)


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")(func)
