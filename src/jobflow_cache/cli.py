"""``cachetool``: inspect, purge, verify and explain the jobflow-cache store from the command line.

Every command works on the configured cache store (``JOBFLOW_CACHE_*`` settings: the embedded
SQLite store by default) or on the one given with ``--store`` (before or after the command).
Tables are fitted to the terminal (``COLUMNS``), coloured on a terminal only (never with
``NO_COLOR``), and show times relative to now; ``--json`` prints only JSON on stdout, with
absolute times. Progress and messages go to stderr. Errors are one line on stderr with exit
status 1 (usage errors: 2); ``--debug`` shows tracebacks. No command creates a store: on a
fresh machine they say that nothing is cached yet.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
from jobflow import Flow, Job
from maggma.core import Sort
from maggma.stores import MemoryStore
from monty.serialization import loadfn
from pydantic import ValidationError
from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from jobflow_cache import __version__
from jobflow_cache.backends.base import unreadable_reason
from jobflow_cache.backends.sqlite import SQLiteBackend
from jobflow_cache.codec import UUID_RE
from jobflow_cache.entry import CacheEntry
from jobflow_cache.errors import CacheError, StoreUnavailableError
from jobflow_cache.executor import Cache
from jobflow_cache.explain import (
    Comparison,
    Inputs,
    job_from_file,
    job_inputs,
    job_outcome,
    nearest,
    open_job_store,
    render,
)
from jobflow_cache.files import ObjectArea
from jobflow_cache.hashing import SCHEME
from jobflow_cache.maintenance import (
    ROW_FIELDS,
    SORT_FIELDS,
    EntryRow,
    Filters,
    parse_age,
    resolve_prefix,
    short_digest,
    stats,
)
from jobflow_cache.plan import MANAGERS, Plan
from jobflow_cache.plan import plan as plan_flow
from jobflow_cache.purge import GCReport, collect_garbage, purge
from jobflow_cache.settings import CacheSettings, config_file, get_settings, setting_sources
from jobflow_cache.store import CacheStore, Outcome
from jobflow_cache.verify import Problem, ProblemKind, verify

__all__ = ["cli", "main"]

logger = logging.getLogger(__name__)

_PAGE = 200
_OUTPUT_LINES = 40
#: Seconds a database server may take to answer before cachetool gives up on it.
CONNECT_TIMEOUT = 2.0


# --------------------------------------------------------------------------- output


def _console(err: bool = False) -> Console:
    """A rich console on the current stdout/stderr: width from the terminal or ``COLUMNS``
    (80 when neither says), colour on a terminal only and never with ``NO_COLOR``."""
    return Console(stderr=err, highlight=False, soft_wrap=False, emoji=False)


def _emit(out: Console, renderable: Any) -> None:
    """Print ``renderable``; off a terminal without the padding rich leaves at line ends."""
    if out.is_terminal:
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    click.echo(text, err=out.stderr)


def _note(text: str) -> None:
    """A message on stderr (dim on a terminal)."""
    _console(err=True).print(Text(text, style="dim"), soft_wrap=True)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _aware(value).isoformat()
    return str(value)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _when(value: Any) -> str:
    """Absolute local time, to the second (``-`` for never)."""
    if not isinstance(value, datetime):
        return "-"
    return _aware(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _ago(value: Any, now: datetime | None = None) -> str:
    """Time relative to now: ``just now``, ``12 min ago``, ``3 h ago``, ``5 d ago``; a date
    after 60 days (``-`` for never).

    Examples
    --------
    >>> from datetime import timedelta
    >>> now = datetime(2026, 1, 31, 12, tzinfo=timezone.utc)
    >>> [_ago(now - timedelta(seconds=s), now) for s in (5, 600, 3 * 3600, 5 * 86400)]
    ['just now', '10 min ago', '3 h ago', '5 d ago']
    """
    if not isinstance(value, datetime):
        return "-"
    now = now or datetime.now(timezone.utc)
    seconds = (now - _aware(value)).total_seconds()
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    if seconds < 60 * 86400:
        return f"{int(seconds // 86400)} d ago"
    return _aware(value).astimezone().strftime("%Y-%m-%d")


def _when_ago(value: Any) -> str:
    """``2026-01-31 12:00:00 (3 h ago)``."""
    return "-" if not isinstance(value, datetime) else f"{_when(value)} ({_ago(value)})"


def _size(n: int | float) -> str:
    """Human-readable bytes (``19 B``, ``1.2 KiB``)."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


@dataclass(frozen=True)
class Column:
    """A table column: ``flex`` columns are shortened (with ``…``) before others are dropped."""

    header: str
    justify: str = "left"
    flex: bool = False
    min_width: int = 6


_GAP = 2  # spaces between columns


def _fit(columns: list[Column], rows: list[list[Text]], width: int) -> list[int | None]:
    """Column widths that fit ``width``: flexible columns are shortened from the right, then
    columns are dropped from the right (``None``) until the table fits."""
    natural = [
        max([len(col.header), *(row[i].cell_len for row in rows)]) for i, col in enumerate(columns)
    ]
    widths: list[int | None] = list(natural)

    def total() -> int:
        shown = [w for w in widths if w is not None]
        return sum(shown) + _GAP * (len(shown) - 1)

    for i in reversed(range(len(columns))):
        excess = total() - width
        if excess <= 0:
            break
        w = widths[i]
        if columns[i].flex and w is not None:
            widths[i] = max(min(columns[i].min_width, w), w - excess)
    for i in reversed(range(1, len(columns))):
        if total() <= width:
            break
        widths[i] = None
    return widths


def _table(
    columns: list[Column],
    rows: list[list[Text]],
    widths: list[int | None] | None = None,
    header: bool = True,
) -> tuple[Table, list[int | None]]:
    """A borderless table fitted to the console (see :func:`_fit`)."""
    console = _console()
    widths = widths or _fit(columns, rows, console.width)
    table = Table(
        box=None,
        pad_edge=False,
        show_edge=False,
        padding=(0, _GAP // 2),
        show_header=header,
        header_style="bold",
        expand=False,
    )
    for col, width in zip(columns, widths):
        if width is not None:
            table.add_column(
                col.header,
                justify=col.justify,  # type: ignore[arg-type]
                width=width,
                no_wrap=True,
                overflow="ellipsis",
            )
    for row in rows:
        table.add_row(*(cell for cell, width in zip(row, widths) if width is not None))
    return table, widths


def _print_table(columns: list[Column], rows: list[list[Text]], out: Console | None = None) -> None:
    table, widths = _table(columns, rows)
    _emit(out or _console(), table)
    dropped = [col.header for col, w in zip(columns, widths) if w is None]
    if dropped:
        _note(f"({', '.join(dropped)} left out to fit {_console().width} columns; see --columns)")


# --------------------------------------------------------------------------- opening the store


def _mongo_uri_spec(uri: str) -> dict[str, Any]:
    database = urlsplit(uri).path.lstrip("/") or "jobflow_cache"
    return {
        "type": "MongoStore",
        "uri": uri,
        "database": database,
        "collection_name": "entries",
    }


def _load_spec(text: str) -> Any:
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
                return _load_spec(value) if isinstance(value, str) else value
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
        reason = _first_line(err).rpartition(": ")[2]
        return StoreUnavailableError(
            f"cannot reach PostgreSQL at {where} ({reason}): check that the server runs and "
            "is reachable from here, and the host, port, database and credentials of the URI"
        )
    return StoreUnavailableError(_first_line(err))


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
        spec = _load_spec(self.spec) if self.spec is not None else settings.STORE
        if isinstance(spec, str):
            spec = _load_spec(spec)
        if spec:
            settings = settings.model_copy(update={"STORE": _with_timeouts(spec)})
        cache = CacheStore.from_settings(settings)
        if self.objects_dir is not None:
            cache.objects_dir = str(Path(self.objects_dir).expanduser())
        self.location = cache.name
        self.missing = self._missing_table(cache)
        if self.missing is not None:  # nothing to read: an empty stand-in, nothing created
            _note(self.missing)
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
        others = ", ".join(f"{n} ({_plural(c, 'row')})" for n, c in tables.items()) or "none"
        return (
            f"{path} has no table {tables_wanted[0]!r}: nothing cached there "
            f"(its tables: {others}; the embedded store's is 'jfc_entries')."
        )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class _Group(click.Group):
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
            raise click.ClickException(_first_line(err)) from err


def _state() -> State:
    return click.get_current_context().find_object(State) or State(None, None, False)


def _cache() -> CacheStore:
    return _state().cache()


class _When(click.ParamType):
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


class _Age(click.ParamType):
    name = "AGE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return parse_age(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class _Prefix(click.ParamType):
    name = "DIGEST"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value).strip().lower()
        if not (4 <= len(text) <= 32 and all(c in "0123456789abcdef" for c in text)):
            self.fail(f"{value!r} is not a digest prefix (4 to 32 hex digits)", param, ctx)
        return text


PREFIX = _Prefix()

_STORE_HELP = (
    "Cache store: a YAML/JSON file (a maggma spec like jobflow's JOB_STORE, or a settings "
    "file with STORE:), inline JSON, or a mongodb:// or postgresql:// URI. Default: "
    "JOBFLOW_CACHE_STORE / the settings file / the embedded SQLite store."
)


def _set_store(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        state = ctx.find_object(State)
        if state is not None:
            state.spec = value


def _common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--store`` after the command too (``cachetool ls --store X``)."""
    return click.option(
        "--store",
        metavar="SPEC",
        expose_value=False,
        is_eager=True,
        callback=_set_store,
        help=_STORE_HELP,
    )(func)


def _filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The selection options shared by ls, purge, verify and stats."""
    options = [
        click.option("--name", help="Job name or Maker class, or a glob such as 'relax*'."),
        click.option(
            "--function",
            help="Function path module:qualname or the Maker's class path, or a glob "
            "('*EmtRelaxMaker*').",
        ),
        click.option("--since", type=_When(), help="Created at or after (date or age: 7d)."),
        click.option("--before", type=_When(), help="Created before (date or age: 30d)."),
        click.option("--invalid", is_flag=True, help="Only entries marked invalid."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _criteria(
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


def _any_filter(*values: Any) -> bool:
    return any(v not in (None, False, ()) for v in values)


def _json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")(func)


# --------------------------------------------------------------------------- the group

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="cachetool")
@click.option("--store", metavar="SPEC", help=_STORE_HELP)
@click.option(
    "--objects-dir",
    metavar="DIR",
    help="Folder of the file objects (default: JOBFLOW_CACHE_OBJECTS_DIR, or DIR/objects).",
)
@click.option("--debug", is_flag=True, help="Log to stderr and show tracebacks.")
@click.pass_context
def cli(ctx: click.Context, store: str | None, objects_dir: str | None, debug: bool) -> None:
    """Inspect, purge, verify and explain the jobflow-cache store.

    Digests can be shortened to any unique prefix of 4 or more hex digits.

    \b
    Examples:
      cachetool ls --limit 20
      cachetool show 3f2c1a9b
      cachetool explain 3f2c1a9b
      cachetool purge --unused-for 90d --dry-run
      cachetool verify --fix
      cachetool config
      cachetool ls --store mongodb://db.example.org/jobflow_cache
    """
    ctx.obj = State(store, objects_dir, debug)
    if debug:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package = logging.getLogger("jobflow_cache")
        package.addHandler(handler)
        package.setLevel(logging.DEBUG)
        ctx.call_on_close(functools.partial(package.removeHandler, handler))


@cli.command()
@_common_options
@_json_option
def info(as_json: bool) -> None:
    """Where the cache lives and how many entries it holds.

    \b
    Examples:
      cachetool info
      cachetool info --json
    """
    state = _state()
    cache = state.cache()
    data = {
        "store": state.location,
        "exists": state.missing is None,
        "objects_dir": cache.objects_dir,
        "entries": cache.count(),
        "disabled": state.settings().DISABLE,
    }
    if as_json:
        _echo_json(data)
        return
    for key, value in data.items():  # plain lines: paths are never cut, they get copied
        if key != "exists":
            click.echo(f"{key:12} {value}")


# --------------------------------------------------------------------------- config


@cli.command()
@_json_option
def config(as_json: bool) -> None:
    """Every setting, its value and where it came from.

    The source is the environment (JOBFLOW_CACHE_<NAME>), the settings file
    (JOBFLOW_CACHE_CONFIG_FILE, default ~/.jobflow-cache.yaml) or the default.

    \b
    Examples:
      cachetool config
      cachetool config --json
      JOBFLOW_CACHE_FILES=copy cachetool config
    """
    rows = setting_sources()
    if as_json:
        _echo_json(
            [
                {"name": r.name, "value": r.value, "source": r.source, "origin": r.origin}
                for r in rows
            ]
        )
        return
    styles = {"environment": "cyan", "file": "magenta", "default": "dim"}
    file, named = config_file()
    exists = file.is_file() or str(file) == os.devnull
    state = "" if exists else " (not found: none used)" if not named else " (not found)"
    click.echo(f"Settings file: {file}{state}")
    out = _console()
    width = max(len(r.name) for r in rows)
    lines = [Text(f"{'NAME':{width}}  {'SOURCE':11}  VALUE", style="bold")]
    for r in rows:  # the value last and whole: paths and specs are copied from here
        lines.append(
            Text.assemble(
                (f"{r.name:{width}}  ", "bold"),
                (f"{r.source:11}  ", styles.get(r.source, "")),
                _setting_text(r.value),
            )
        )
    for line in lines:
        if out.is_terminal:
            out.print(line, soft_wrap=True)
        else:
            click.echo(line.plain)


def _setting_text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


# --------------------------------------------------------------------------- ls


@dataclass(frozen=True)
class _Row:
    row: EntryRow
    maker: str | None
    short: str


#: ``--columns`` names: header, and how each column shrinks
LS_COLUMNS: dict[str, Column] = {
    "digest": Column("DIGEST", min_width=8),
    "name": Column("NAME", flex=True, min_width=8),
    "function": Column("FUNCTION", flex=True, min_width=12),
    "maker": Column("MAKER", flex=True, min_width=10),
    "created": Column("CREATED"),
    "last-hit": Column("LAST HIT"),
    "hits": Column("HITS", justify="right"),
    "files": Column("FILES", justify="right"),
    "valid": Column("VALID"),
    "reason": Column("INVALID REASON", flex=True, min_width=10),
}
DEFAULT_COLUMNS = ("digest", "name", "function", "created", "last-hit", "hits", "files", "valid")


def _cells(item: _Row, columns: Iterable[str], now: datetime) -> list[Text]:
    row = item.row
    invalid = not row.valid
    values: dict[str, Callable[[], Text]] = {
        "digest": lambda: Text(item.short, style="yellow"),
        "name": lambda: Text(row.name, style="bold"),
        "function": lambda: Text(row.function),
        "maker": lambda: Text(item.maker or "-"),
        "created": lambda: Text(_ago(row.created, now)),
        "last-hit": lambda: Text(_ago(row.last_hit, now), style="green" if row.hits else "dim"),
        "hits": lambda: Text(str(row.hits), style="bold green" if row.hits else "dim"),
        "files": lambda: Text(
            f"{row.files} ({_size(row.files_size)})" if row.files else "-",
            style="" if row.files else "dim",
        ),
        "valid": lambda: Text("yes", style="green") if row.valid else Text("NO", style="bold red"),
        "reason": lambda: Text(row.invalid_reason or "-", style="red" if invalid else "dim"),
    }
    cells = [values[name]() for name in columns]
    if invalid:
        for cell in cells:
            cell.stylize("red")
    return cells


def _rows(
    cache: CacheStore, criteria: dict[str, Any], sort: str, reverse: bool, limit: int
) -> Generator[_Row, None, None]:
    order: dict[str, Sort | int] = {SORT_FIELDS[sort]: 1 if reverse else -1}
    docs = cache.find(criteria, properties=[*ROW_FIELDS, "maker"], sort=order, limit=limit)
    try:
        for doc in docs:
            row = EntryRow.from_document(doc)
            maker = doc.get("maker")
            maker = maker if isinstance(maker, str) else None
            yield _Row(row, maker, short_digest(cache, row.digest))
    finally:
        close = getattr(docs, "close", None)
        if close is not None:
            close()


class _Columns(click.ParamType):
    name = "COLUMNS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        names = tuple(n.strip().lower() for n in str(value).split(",") if n.strip())
        unknown = [n for n in names if n not in LS_COLUMNS]
        if unknown or not names:
            self.fail(
                f"unknown column(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(LS_COLUMNS)}",
                param,
                ctx,
            )
        return names


def _print_rows(rows: Iterable[_Row], columns: tuple[str, ...], out: Console) -> int:
    """The rows as tables of up to :data:`_PAGE` rows, the widths of the first (streamed)."""
    now = datetime.now(timezone.utc)
    spec = [LS_COLUMNS[name] for name in columns]
    shown = 0
    widths: list[int | None] | None = None
    page: list[list[Text]] = []

    def flush(page: list[list[Text]]) -> None:
        nonlocal widths
        table, fitted = _table(spec, page, widths, header=widths is None)
        if widths is None:
            widths = fitted
            dropped = [c.header for c, w in zip(spec, fitted) if w is None]
        else:
            dropped = []
        _emit(out, table)
        if dropped:
            _note(f"({', '.join(dropped)} left out to fit {out.width} columns; see --columns)")

    for item in rows:
        page.append(_cells(item, columns, now))
        shown += 1
        if len(page) == _PAGE:
            flush(page)
            page = []
    if page:
        flush(page)
    return shown


@cli.command("ls")
@_common_options
@_filter_options
@click.option(
    "--sort",
    type=click.Choice(list(SORT_FIELDS)),
    default="created",
    show_default=True,
    help="Sort key (newest/largest first).",
)
@click.option("--reverse", "-r", is_flag=True, help="Oldest/smallest first.")
@click.option(
    "--limit", "-n", default=50, show_default=True, help="Show at most this many (0: all)."
)
@click.option(
    "--columns",
    "-c",
    type=_Columns(),
    default=",".join(DEFAULT_COLUMNS),
    show_default=True,
    help=f"Columns to show, comma-separated: {', '.join(LS_COLUMNS)}.",
)
@_json_option
def ls_command(
    name: str | None,
    function: str | None,
    since: datetime | None,
    before: datetime | None,
    invalid: bool,
    sort: str,
    reverse: bool,
    limit: int,
    columns: tuple[str, ...],
    as_json: bool,
) -> None:
    """List cache entries, newest first.

    The table is fitted to the terminal: long names and functions are shortened, and columns
    that do not fit are left out (say which with --columns). Times are relative to now; --json
    gives them in full (ISO 8601, UTC).

    \b
    Examples:
      cachetool ls
      cachetool ls --name 'relax*' --since 7d
      cachetool ls --function '*EmtRelaxMaker*' --sort hits
      cachetool ls --columns digest,name,maker,hits
      cachetool ls --invalid --json
    """
    cache = _cache()
    criteria = _criteria(name, function, since, before, invalid)
    rows = _rows(cache, criteria, sort, reverse, limit)
    # closed while the store is open, also when the reader of a pipe has gone (| head)
    click.get_current_context().call_on_close(rows.close)
    if as_json:  # streamed: the same text as one json.dumps(indent=2) of the whole list
        opening = "["
        for item in rows:
            data = {**item.row.to_dict(), "maker": item.maker, "short": item.short}
            text = json.dumps(data, indent=2, default=_json_default).replace("\n", "\n  ")
            click.echo(f"{opening}\n  {text}", nl=False)
            opening = ","
        click.echo("[]" if opening == "[" else "\n]")
        return
    shown = _print_rows(rows, columns, _console())
    if not shown:
        if _state().missing is None:
            _note("No entries.")
        return
    if limit and shown == limit:
        _note(f"(first {limit} shown; --limit 0 shows all)")


# --------------------------------------------------------------------------- show


def _find_document(cache: CacheStore, prefix: str) -> dict[str, Any]:
    digest = resolve_prefix(cache, prefix)
    doc = next(iter(cache.find({"digest": digest}, limit=1)), None)
    if doc is None:  # removed meanwhile
        raise CacheError(f"entry {digest} vanished")
    doc.pop("_id", None)
    return doc


def _status(entry: CacheEntry, cache: CacheStore) -> str:
    found = CacheStore.check_entry(entry)
    if found.outcome is not Outcome.HIT:
        return f"not served: {found.reason}"
    if entry.files and not _objects(cache).has_all(entry.files):
        return "not served: file objects missing (run cachetool verify)"
    return "served on a hit"


def _objects(cache: CacheStore) -> ObjectArea:
    return ObjectArea(cache.objects_dir)


def _pretty(text: str) -> str:
    """JSON text indented (other text as it is)."""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except (ValueError, TypeError):
        return text


def _show(entry: CacheEntry, cache: CacheStore, full: bool, maker: str | None) -> None:
    out = _console()
    status = _status(entry, cache)
    head = [
        ("digest", Text(entry.digest, style="yellow")),
        ("name", Text(entry.name)),
        ("function", Text(entry.function)),
        ("maker", Text(maker or "-")),
        ("status", Text(status, style="green" if status == "served on a hit" else "bold red")),
        ("created", Text(_when_ago(entry.created))),
        ("hits", Text(f"{entry.hits} (last {_when_ago(entry.last_hit)})")),
    ]
    if not entry.valid:
        head.insert(5, ("invalid", Text(str(entry.invalid_reason), style="red")))
    for key, value in head:  # whole lines, never cut
        line = Text.assemble((f"{key:9} ", "bold"), value)
        if out.is_terminal:
            out.print(line, soft_wrap=True)
        else:
            click.echo(line.plain)

    note = "" if entry.canonical_input is not None else " (canonical input over the size cap)"
    inputs = Table(box=None, pad_edge=False, show_header=False, padding=(0, 1))
    inputs.add_column(style="bold", no_wrap=True)
    inputs.add_column(style="dim", no_wrap=True)
    inputs.add_column(overflow="fold")
    canonical = entry.canonical_input
    for name in sorted(entry.arg_digests):
        kept = canonical is not None and name in canonical
        shown = render(canonical[name], 10_000) if kept else "(not kept)"  # type: ignore[index]
        inputs.add_row(name, entry.arg_digests[name][:12], shown)
    if not entry.arg_digests:
        inputs.add_row("(no arguments)", "", "")
    _emit(out, Panel(inputs, title=f"inputs{note}", title_align="left", expand=False))

    text = _pretty(entry.output)
    lines = text.splitlines()
    cut = not full and len(lines) > _OUTPUT_LINES
    if cut:
        text = "\n".join(lines[:_OUTPUT_LINES])
    title = f"output ({_size(len(entry.output))})"
    subtitle = f"{len(lines) - _OUTPUT_LINES} more lines: --full shows all" if cut else None
    body = Syntax(text, "json", word_wrap=True, theme="ansi_dark", background_color="default")
    _emit(out, Panel(body, title=title, title_align="left", subtitle=subtitle, expand=False))
    if entry.response:
        kinds = ", ".join(sorted(json.loads(entry.response)))
        dynamic = " (dynamic: makes new jobs)" if entry.dynamic else ""
        _emit(out, Text.assemble(("response  ", "bold"), f"{kinds}{dynamic}"))

    files = Table(box=None, pad_edge=False, show_header=False, padding=(0, 1))
    files.add_column(overflow="fold")
    files.add_column(justify="right", no_wrap=True)
    files.add_column(style="dim", no_wrap=True)
    files.add_column(style="dim", no_wrap=True)
    for f in entry.files:
        files.add_row(f.path, _size(f.size), f.xxh3[:12], oct(f.mode))
    for path, size in sorted(entry.files_skipped.items()):
        files.add_row(path, _size(size), "not kept", "(over MAX_FILE_SIZE)")
    if entry.files or entry.files_skipped:
        title = f"files: {len(entry.files)} ({_size(entry.files_size)})"
        _emit(out, Panel(files, title=title, title_align="left", expand=False))
    else:
        _emit(out, Text.assemble(("files  ", "bold"), "none"))

    versions = ", ".join(f"{k} {v}" for k, v in sorted(entry.versions.items()))
    _emit(out, Text("provenance", style="bold"))
    for key, text in (  # plain lines: paths are never cut, they get copied
        ("source job", f"{entry.source_uuid} (index {entry.source_index})"),
        ("run folder", entry.source_dir or "-"),
        ("host", entry.host),
        ("python", entry.python),
        ("duration", _duration(entry.duration)),
        ("scheme", entry.scheme),
        ("cache version", entry.cache_version or "-"),
        ("versions", versions or "-"),
        ("checksum", entry.checksum),
    ):
        click.echo(f"  {key:13} {text}")


@cli.command()
@_common_options
@click.argument("digest", type=PREFIX)
@click.option("--full", is_flag=True, help="Do not shorten the output.")
@_json_option
def show(digest: str, full: bool, as_json: bool) -> None:
    """Show one entry in full: inputs, output (indented JSON), files and provenance.

    \b
    Examples:
      cachetool show 3f2c1a9b
      cachetool show 3f2c1a9b --full
      cachetool show 3f2c1a9b --json
    """
    cache = _cache()
    doc = _find_document(cache, digest)
    maker = doc.get("maker") if isinstance(doc.get("maker"), str) else None
    unreadable = unreadable_reason(doc)
    if unreadable is not None:  # a damaged row: said in one line, never a traceback
        if as_json:
            _echo_json({"digest": doc.get("digest"), "status": f"unreadable: {unreadable}"})
            return
        raise CacheError(
            f"entry {doc.get('digest')} is unreadable: {unreadable} "
            "(`cachetool verify --fix` removes it; the job then records a sound entry)"
        )
    try:
        entry = CacheEntry.from_document(doc)
    except (ValidationError, TypeError, ValueError) as err:
        if as_json:
            _echo_json({**doc, "status": f"does not decode: {_first_line(err)}"})
            return
        click.echo(json.dumps(doc, indent=2, default=_json_default))
        raise CacheError(f"entry {doc.get('digest')} does not decode: {_first_line(err)}") from err
    if as_json:
        _echo_json({**entry.model_dump(mode="json"), "status": _status(entry, cache)})
        return
    _show(entry, cache, full, maker)


# --------------------------------------------------------------------------- invalidate


_CASCADE_HELP = (
    "Leave the entries that consumed these (their jobs used these outputs) as they are. By "
    "default they go too: a result computed from a wrong one is wrong as well."
)


def _show_dependents(cache: CacheStore, dependents: list[str], out: Console, verb: str) -> None:
    """The entries a cascade reaches (the first 10 as a table)."""
    _emit(out, Text(f"{verb} too, because they consumed these (--no-cascade leaves them):"))
    criteria = {"digest": {"$in": dependents[:10]}}
    _print_rows(_rows(cache, criteria, "created", False, 10), DEFAULT_COLUMNS, out)
    if len(dependents) > 10:
        _emit(out, f"... and {len(dependents) - 10} more")


@cli.command()
@_common_options
@click.argument("digests", type=PREFIX, nargs=-1, required=True)
@click.option("--reason", default="invalidated with cachetool", show_default=True)
@click.option("--no-cascade", is_flag=True, help=_CASCADE_HELP)
@click.option("--yes", "-y", is_flag=True, help="Do not ask before invalidating dependents.")
def invalidate(digests: tuple[str, ...], reason: str, no_cascade: bool, yes: bool) -> None:
    """Mark entries invalid: kept for inspection, never served (the job runs again).

    The entries that consumed them, transitively (a static calculation that parsed the
    OUTCAR of a relaxation with a wrong POTCAR), are invalidated too: they are listed and
    you are asked first, unless --yes. --no-cascade leaves them as they are.

    \b
    Examples:
      cachetool invalidate 3f2c1a9b
      cachetool invalidate 3f2c1a9b 77e0d2c4 --reason "wrong pseudopotentials" --yes
      cachetool invalidate 3f2c1a9b --no-cascade
    """
    cache = _cache()
    resolved = list(dict.fromkeys(resolve_prefix(cache, prefix) for prefix in digests))
    dependents = [] if no_cascade else cache.dependents(resolved)
    if dependents:
        _show_dependents(cache, dependents, _console(err=True), "Invalidated")
        if not yes:
            total = len(resolved) + len(dependents)
            click.confirm(f"Invalidate {total} entries?", abort=True, err=True)
    marked = cache.invalidate(resolved, reason, cascade=not no_cascade)
    for full in marked:
        why = reason if full in resolved else f"{reason} (consumed an invalidated entry)"
        click.echo(f"invalidated {short_digest(cache, full)}: {why}")


# --------------------------------------------------------------------------- purge and gc


def _objects_text(report: GCReport) -> str:
    """``2 file objects, 5.9 KiB`` (and what run folders still hold)."""
    total = report.bytes_freed + report.bytes_linked
    text = f"{_plural(report.objects, 'file object')}, {_size(total)}"
    if report.bytes_linked:
        text += f" ({_size(report.bytes_linked)} of it held by hard links in run folders)"
    return text


@cli.command("purge")
@_common_options
@_filter_options
@click.option("--older-than", type=_Age(), help="Created longer ago than this (30d, 12h).")
@click.option("--unused-for", type=_Age(), help="Not served for this long (never: since made).")
@click.option("--digest", "prefixes", type=PREFIX, multiple=True, help="This entry (repeatable).")
@click.option("--all", "everything", is_flag=True, help="Every entry.")
@click.option("--dry-run", is_flag=True, help="Show what would go; delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--no-gc", is_flag=True, help="Keep the file objects of removed entries.")
@click.option(
    "--outdated",
    is_flag=True,
    help="Entries of an older hash scheme (never served: their jobs miss cleanly).",
)
@click.option("--no-cascade", is_flag=True, help=_CASCADE_HELP)
@_json_option
def purge_command(
    name: str | None,
    function: str | None,
    since: datetime | None,
    before: datetime | None,
    invalid: bool,
    older_than: Any,
    unused_for: Any,
    prefixes: tuple[str, ...],
    everything: bool,
    dry_run: bool,
    yes: bool,
    no_gc: bool,
    outdated: bool,
    no_cascade: bool,
    as_json: bool,
) -> None:
    """Remove entries, then the file objects no remaining entry uses.

    The entries that consumed a removed one go too, transitively (--no-cascade keeps them);
    they are listed before anything is removed. Asks for confirmation unless --yes. Objects
    still used by any remaining entry (including entries marked invalid) are never deleted.

    \b
    Examples:
      cachetool purge --older-than 90d --dry-run
      cachetool purge --unused-for 30d --yes
      cachetool purge --function 'tests.jobs:*' --invalid
      cachetool purge --digest 3f2c1a9b
      cachetool purge --outdated --yes
      cachetool purge --all --yes
    """
    chosen = (name, function, since, before, invalid, older_than, unused_for, prefixes, outdated)
    if not _any_filter(*chosen):
        if not everything:
            raise click.UsageError("say which entries: give a filter (see --help) or --all")
    elif everything:
        raise click.UsageError("--all cannot be combined with filters")
    cache = _cache()
    now = datetime.now(timezone.utc)
    if older_than is not None:
        cutoff = now - older_than
        before = cutoff if before is None else min(_aware(before), cutoff)
    digests = tuple(resolve_prefix(cache, prefix) for prefix in prefixes)
    unused = now - unused_for if unused_for is not None else None
    criteria = _criteria(
        name, function, since, before, invalid, unused_since=unused, digests=digests
    )
    options = {"gc": not no_gc, "cascade": not no_cascade, "outdated_schemes": outdated}
    preview = purge(cache, criteria, dry_run=True, **options)
    if not preview.entries:
        if as_json:
            _echo_json(preview.to_dict())
        else:
            _note("No entries match.")
        return
    listed = criteria
    if outdated:
        old_scheme = {"scheme": {"$ne": SCHEME}}
        listed = {"$and": [criteria, old_scheme]} if criteria else old_scheme
    matching = preview.entries - len(preview.cascaded)
    out = _console(err=as_json)
    _print_rows(_rows(cache, listed, "created", False, 10), DEFAULT_COLUMNS, out)
    if matching > 10:
        _emit(out, f"... and {matching - 10} more")
    if preview.cascaded:
        _show_dependents(cache, preview.cascaded, out, "Removed")
    if dry_run:
        report = preview
    else:
        if not yes:
            click.confirm(f"Remove {preview.entries} entries?", abort=True, err=True)
        report = purge(cache, criteria, **options)
    if as_json:
        _echo_json(report.to_dict())
        return
    removed = _plural(report.entries, "entry", "entries")
    removed += " (file objects kept)" if no_gc else f" and {_objects_text(report.gc)}"
    click.echo(
        f"Dry run, nothing deleted: would remove {removed}" if dry_run else f"Removed {removed}"
    )


@cli.command()
@_common_options
@click.option("--dry-run", is_flag=True, help="Count only; delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_json_option
def gc(dry_run: bool, yes: bool, as_json: bool) -> None:
    """Delete file objects that no entry references (left by crashes or --no-gc).

    \b
    Examples:
      cachetool gc --dry-run
      cachetool gc --yes
    """
    cache = _cache()
    report = collect_garbage(cache, dry_run=True)
    if not dry_run and report.objects:
        if not yes:
            click.confirm(
                f"Delete {report.objects} unreferenced file objects?", abort=True, err=True
            )
        report = collect_garbage(cache)
    if as_json:
        _echo_json(report.to_dict())
    else:
        click.echo(f"{'Would delete' if dry_run else 'Deleted'} {_objects_text(report)}")


# --------------------------------------------------------------------------- verify


@cli.command("verify")
@_common_options
@_filter_options
@click.option("--limit", "-n", default=0, help="Check at most this many entries (0: all).")
@click.option("--quick", is_flag=True, help="Compare file sizes only; do not re-hash files.")
@click.option("--fix", is_flag=True, help="Invalidate (or remove) broken entries.")
@_json_option
def verify_command(
    name: str | None,
    function: str | None,
    since: datetime | None,
    before: datetime | None,
    invalid: bool,
    limit: int,
    quick: bool,
    fix: bool,
    as_json: bool,
) -> None:
    """Check entries: they decode, outputs decode, checksums match, the scheme is current,
    every manifest file exists with its recorded size and xxh3.

    Exit status 0 when everything checked is sound, or when --fix fixed every problem; 1 when
    a problem remains. --fix invalidates broken entries (undecodable and outdated-scheme ones
    are removed) and deletes corrupt file objects. Entries already marked invalid are not
    checked.

    \b
    Examples:
      cachetool verify
      cachetool verify --since 7d --quick
      cachetool verify --fix
      cachetool verify --json
    """
    cache = _cache()
    criteria = _criteria(name, function, since, before, invalid)
    total = cache.count(criteria)
    total = min(total, limit) if limit else total
    with click.progressbar(
        length=total, label="verifying", file=sys.stderr, hidden=not sys.stderr.isatty()
    ) as bar:
        problems = verify(
            cache,
            criteria,
            fix=fix,
            limit=limit,
            hash_files=not quick,
            on_entry=lambda: bar.update(1),
        )
    broken = {p.digest for p in problems if p.digest}
    unfixed = [p for p in problems if not p.fixed]
    if as_json:
        _echo_json(
            {
                "checked": total,
                "sound": not problems,
                "fixed": bool(problems) and not unfixed,
                "broken_entries": len(broken),
                "problems": [p.to_dict() for p in problems],
            }
        )
    else:
        out = _console()
        for line in _problem_lines(problems):
            _emit(out, line)
        checked = f"Checked {_plural(total, 'entry', 'entries')}: "
        if not problems:
            _emit(out, Text(checked + "all sound.", style="green"))
        else:
            found = f"{_plural(len(problems), 'problem')} in "
            found += _plural(len(broken), "entry", "entries")
            if fix and not unfixed:
                _emit(out, Text(f"{checked}{found}, all fixed.", style="yellow"))
            elif fix:
                _emit(out, Text(f"{checked}{found}, {len(unfixed)} not fixed.", style="red"))
            else:
                _emit(out, Text(f"{checked}{found}.", style="red"))
    if unfixed:
        click.get_current_context().exit(1)


def _problem_lines(problems: list[Problem]) -> Iterator[Text]:
    for kind in ProblemKind:
        found = [p for p in problems if p.kind is kind]
        if not found:
            continue
        yield Text(f"{kind.value} ({len(found)}):", style="bold red")
        for p in found:
            who = p.digest[:12] if p.digest else "cache"
            line = Text.assemble("  ", (who, "yellow"), f"  {p.message}")
            if p.fixed:
                line.append(f"  [{p.fixed}]", style="green")
            yield line


# --------------------------------------------------------------------------- stats


@cli.command("stats")
@_common_options
@click.option("--top", default=10, show_default=True, help="Functions listed (0: all).")
@_json_option
def stats_command(top: int, as_json: bool) -> None:
    """Entries, hits, time saved, file sizes, deduplication and entries per function.

    \b
    Examples:
      cachetool stats
      cachetool stats --top 0 --json
    """
    result = stats(_cache())
    if as_json:
        _echo_json(result.to_dict())
        return
    out = _console()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    invalid = Text(f" ({result.invalid} invalid)", style="red" if result.invalid else "")
    grid.add_row("entries", Text.assemble(str(result.entries), invalid))
    grid.add_row("hits", f"{result.hits} ({_duration(result.time_saved)} of compute saved)")
    grid.add_row("file bytes", f"{_size(result.files_bytes)} named by manifests")
    grid.add_row(
        "object area",
        f"{result.objects} objects, {_size(result.objects_bytes)} "
        f"(dedup ratio {result.dedup_ratio:.2f})",
    )
    created = "-" if result.oldest is None else f"{_ago(result.oldest)} .. {_ago(result.newest)}"
    grid.add_row("created", created)
    functions = list(result.functions.items())
    shown = functions[:top] if top else functions
    grid.add_row("functions", str(len(functions)))
    _emit(out, grid)
    if shown:
        columns = [Column("ENTRIES", justify="right"), Column("FUNCTION", flex=True)]
        _print_table(columns, [[Text(str(n)), Text(f)] for f, n in shown], out)
    if len(shown) < len(functions):
        _emit(out, f"... {len(functions) - len(shown)} more (--top 0 lists all)")


# --------------------------------------------------------------------------- explain


def _explain_lines(now: Inputs, comparisons: list[Comparison], ranked: int) -> Iterator[str]:
    if not comparisons:
        yield f"No other cached entry of {now.function}: it never ran with this function path"
        yield "(or its entries were purged), so there is nothing to compare with."
        return
    count = len(comparisons)
    yield f"Nearest {count} of {ranked} other cached entries of {now.function} (cached -> now):"
    for number, comp in enumerate(comparisons, 1):
        yield ""
        yield f"{number}. {(comp.digest or '?')[:12]}  {comp.name}  created {_ago(comp.created)}"
        if comp.cache_version is not None:
            old, new = comp.cache_version
            yield f"   cache_version: {old!r} -> {new!r}"
        for label, names in (
            ("same", comp.equal),
            ("differs", comp.changed),
            ("only in this job", comp.only_now),
            ("only in the entry", comp.only_cached),
            ("unresolved (not compared)", comp.unresolved),
        ):
            if names:
                yield f"   {label}: {', '.join(names)}"
        shown = comp.differences[:_DIFFS]
        for difference in shown:
            yield f"     {difference.describe()}"
        if len(comp.differences) > len(shown):
            yield f"     ... {len(comp.differences) - len(shown)} more differences"
        for name in comp.not_kept:
            yield f"     {name}: canonical input not kept (over MAX_CANONICAL_INPUT)"
        if not (comp.changed or comp.only_now or comp.only_cached or comp.cache_version):
            yield "   every compared argument is equal"


_DIFFS = 20


@cli.command()
@_common_options
@click.argument("target", required=False)
@click.option(
    "--job",
    "job_file",
    type=click.Path(exists=True, dir_okay=False),
    help="A serialized Job or Flow (JSON/YAML) to explain.",
)
@click.option("--uuid", help="With --job: which job of the flow.")
@click.option(
    "--jobstore",
    metavar="SPEC",
    help="JobStore to read jobs and resolve references from: jobflow's JOB_STORE forms or a "
    "maggma spec, as a file or inline JSON (default for a job uuid: jobflow's JOB_STORE).",
)
@click.option("--count", default=3, show_default=True, help="Nearest entries shown.")
@_json_option
def explain(
    target: str | None,
    job_file: str | None,
    uuid: str | None,
    jobstore: str | None,
    count: int,
    as_json: bool,
) -> None:
    """Why did a job miss? Compare its inputs with the nearest cached entries.

    TARGET is a digest prefix (the entry a job recorded after it ran) or a job uuid (its
    JobStore record holds its digest and what the cache did). With --job, the digest of a
    serialized job is computed; arguments that are still output references are resolved from
    --jobstore, or listed and left out.

    For each nearest entry of the same function: which arguments are equal and which differ,
    and where they differ, field by field: cached value -> this job's value.

    \b
    Examples:
      cachetool explain 3f2c1a9b
      cachetool explain 1c4e2a8f-3b5d-4c6e-9f7a-0b1c2d3e4f5a --jobstore jobstore.yaml
      cachetool explain --job flow.json --uuid 1c4e2a8f-3b5d-4c6e-9f7a-0b1c2d3e4f5a
    """
    if (target is None) == (job_file is None):
        raise click.UsageError("give a digest prefix or a job uuid, or --job FILE")
    cache = _cache()
    spec = _load_spec(jobstore) if jobstore else None
    lines: list[str] = []
    if job_file is not None:
        job_store = open_job_store(spec) if spec else None
        now = job_inputs(job_from_file(job_file, uuid), cache, job_store)
        head = f"Job {now.name} ({now.function})"
        if now.digest is None:
            where = " not found in the JobStore" if job_store else " (see --jobstore)"
            lines.append(f"{head}: digest unknown, some inputs are output references{where}:")
            lines.extend(f"  {name}: {ref}" for name, ref in now.unresolved.items())
        else:
            found = cache.lookup(now.digest)
            if found.outcome is Outcome.HIT:
                lines.append(f"{head}: digest {now.digest}, would be served from the cache.")
                _finish(as_json, lines, now, None, 0)
                return
            state = "not cached" if found.outcome is Outcome.MISS else f"not served: {found.reason}"
            lines.append(f"{head}: digest {now.digest}, {state}.")
    elif UUID_RE.fullmatch(target.strip().lower()):  # type: ignore[union-attr]
        lines, doc = job_outcome(target.strip().lower(), cache, open_job_store(spec))  # type: ignore[union-attr]
        if doc is None:
            _finish(as_json, lines, None, None, 0)
            return
        now = Inputs.from_document(doc)
    else:
        doc = _find_document(cache, PREFIX.convert(target, None, None))
        now = Inputs.from_document(doc)
        short = str(doc["digest"])[:12]
        lines.append(f"Entry {short}  {now.name}  {now.function}  created {_ago(now.created)}")
    exclude = frozenset({now.digest}) if now.digest else frozenset()
    comparisons, ranked = nearest(cache, now, exclude=exclude, count=count)
    _finish(as_json, lines, now, comparisons, ranked)


def _finish(
    as_json: bool,
    lines: list[str],
    now: Inputs | None,
    comparisons: list[Comparison] | None,
    ranked: int,
) -> None:
    """Print what explain found; ``comparisons`` is None when there was nothing to compare."""
    if as_json:
        data: dict[str, Any] = {"summary": lines}
        if now is not None:
            data["job"] = {
                "function": now.function,
                "digest": now.digest,
                "name": now.name,
                "cache_version": now.cache_version,
                "arg_digests": dict(now.arg_digests),
                "unresolved": dict(now.unresolved),
            }
        if comparisons is not None:
            data["ranked"] = ranked
            data["nearest"] = [c.to_dict() for c in comparisons]
        _echo_json(data)
        return
    for line in lines:
        click.echo(line)
    if now is not None and comparisons is not None:
        if lines:
            click.echo("")
        for line in _explain_lines(now, comparisons, ranked):
            click.echo(line)


# --------------------------------------------------------------------------- plan

_PLAN_STYLES = {"served": "green", "run": "yellow", "unknown": "dim"}


def _flow_from_file(path: str) -> Any:
    """The Flow, Job or list of jobs serialized in ``path`` (JSON or YAML)."""
    try:
        loaded = loadfn(path)
    except Exception as err:
        hint = ""
        if isinstance(err, ImportError):  # the module of its jobs, not on sys.path here
            hint = " (the modules of its jobs must be importable: see PYTHONPATH)"
        raise CacheError(f"cannot read flow file {path}: {err}{hint}") from err
    if isinstance(loaded, (Flow, Job)) or (
        isinstance(loaded, list) and loaded and all(isinstance(j, (Flow, Job)) for j in loaded)
    ):
        return loaded
    raise CacheError(f"{path} holds a {type(loaded).__name__}, not a serialized Flow or Job")


@cli.command("plan")
@_common_options
@click.argument("flow_file", metavar="FLOW", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--jobstore",
    metavar="SPEC",
    help="JobStore whose jobs count as done (references to them are resolved from it): "
    "jobflow's JOB_STORE forms or a maggma spec, as a file or inline JSON.",
)
@click.option(
    "--manager",
    type=click.Choice(MANAGERS),
    default="local",
    show_default=True,
    help="The manager that will run the flow: FireWorks and jobflow-remote hand a job its "
    "inputs through their own serialization (tuples as lists), so some digests differ.",
)
@_json_option
def plan_command(flow_file: str, jobstore: str | None, manager: str, as_json: bool) -> None:
    """Which jobs of a flow the cache serves ahead of submission.

    FLOW is a serialized Flow, Job or list of jobs (JSON or YAML, as monty's dumpfn writes
    it). For every job, in jobflow's order:

    \b
      served   every job it depends on is served too, and the cache holds a
               servable entry of it: Plan.apply puts it in the JobStore
      run      its digest is known, but it is not served ahead (not cached, an
               invalid entry, or a dynamic job the worker serves: see the reason)
      unknown  it depends on a job that runs

    Nothing is written: not to the cache, not to the JobStore. Serve the jobs with
    jobflow_cache.plan(flow).apply(job_store) from Python.

    \b
    Examples:
      cachetool plan flow.json
      cachetool plan flow.json --jobstore jobstore.yaml --json
      cachetool plan flow.json --manager jobflow-remote
    """
    flow = _flow_from_file(flow_file)  # a bad file first: before the store is opened
    cache = _cache()
    job_store = open_job_store(_load_spec(jobstore)) if jobstore else None
    result = plan_flow(flow, cache=Cache(cache), job_store=job_store, manager=manager)
    if as_json:
        _echo_json(result.to_dict())
        return
    _print_plan(result)


def _print_plan(result: Plan) -> None:
    columns = [
        Column("status"),
        Column("name", flex=True),
        Column("digest"),
        Column("reason", flex=True, min_width=20),
        Column("uuid"),
    ]
    rows = [
        [
            Text(job.status, style=_PLAN_STYLES[job.status]),
            Text(job.name),
            Text(job.digest[:12] if job.digest else "-"),
            Text(job.reason),
            Text(job.uuid),
        ]
        for job in result
    ]
    if rows:
        _print_table(columns, rows)
    click.echo(result.summary())


def main() -> None:
    """Console-script entry point: errors are one line on stderr, exit status 1 (usage: 2);
    Ctrl-C exits with 130; a closed pipe (``cachetool ls | head -2``) ends it quietly."""
    try:
        cli.main(prog_name="cachetool")
    except BrokenPipeError:  # as click does for EPIPE: no traceback, no further writes
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
