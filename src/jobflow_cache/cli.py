"""``cachetool``: inspect, purge, verify and explain the jobflow-cache store from the command line.

Every command works on the configured cache store (``JOBFLOW_CACHE_*`` settings: the embedded
SQLite store by default) or on the one given with ``--store``. ``--json`` prints only JSON on
stdout; progress and messages go to stderr. Errors are one line on stderr with exit status 1
(usage errors: 2); ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
from monty.serialization import loadfn
from pydantic import ValidationError

from jobflow_cache import __version__
from jobflow_cache.codec import UUID_RE
from jobflow_cache.entry import CacheEntry
from jobflow_cache.errors import CacheError, StoreUnavailableError
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
from jobflow_cache.maintenance import (
    SORT_FIELDS,
    Filters,
    iter_rows,
    parse_age,
    resolve_prefix,
    short_digest,
    stats,
)
from jobflow_cache.purge import GCReport, collect_garbage, purge
from jobflow_cache.settings import get_settings
from jobflow_cache.store import CacheStore, Outcome, store_from_spec
from jobflow_cache.verify import Problem, ProblemKind, verify

__all__ = ["cli", "main"]

logger = logging.getLogger(__name__)

_PAGE = 200
_OUTPUT_CHARS = 600


# --------------------------------------------------------------------------- plumbing


def _load_spec(text: str) -> Any:
    """A store spec given on the command line: inline JSON (``{...}``) or a YAML/JSON file."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise StoreUnavailableError(f"malformed store spec (not JSON): {err}") from err
    path = Path(text).expanduser()
    if not path.is_file():
        raise StoreUnavailableError(f"store spec file {path} does not exist")
    try:
        return loadfn(path)
    except Exception as err:
        raise StoreUnavailableError(f"malformed store spec file {path}: {err}") from err


class State:
    """What the group's options set up: the cache store is opened on first use."""

    def __init__(self, store: str | None, objects_dir: str | None, debug: bool) -> None:
        self.spec = store
        self.objects_dir = objects_dir
        self.debug = debug
        self._cache: CacheStore | None = None

    def cache(self) -> CacheStore:
        """The connected cache store (closed when the command ends)."""
        if self._cache is None:
            try:
                settings = get_settings()
            except (ValueError, ValidationError) as err:
                raise CacheError(f"bad jobflow-cache settings: {_first_line(err)}") from err
            if self.spec is None:
                cache = CacheStore.from_settings(settings)
            else:
                cache = CacheStore(store_from_spec(_load_spec(self.spec)), settings.objects_dir())
            if self.objects_dir is not None:
                cache.objects_dir = str(Path(self.objects_dir).expanduser())
            cache.connect()
            click.get_current_context().call_on_close(cache.close)
            self._cache = cache
        return self._cache


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class _Group(click.Group):
    """A click group that turns cache and OS errors into one line on stderr (exit 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (CacheError, OSError) as err:
            state = ctx.obj if isinstance(ctx.obj, State) else None
            if state is not None and state.debug:
                raise
            raise click.ClickException(_first_line(err)) from err


def _state() -> State:
    return click.get_current_context().find_object(State) or State(None, None, False)


def _cache() -> CacheStore:
    return _state().cache()


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _aware(value).isoformat()
    return str(value)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _when(value: Any) -> str:
    """Local time, to the minute (``-`` for never)."""
    if not isinstance(value, datetime):
        return "-"
    return _aware(value).astimezone().strftime("%Y-%m-%d %H:%M")


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


def _table(rows: list[list[str]], right: Iterable[int] = ()) -> Iterator[str]:
    """Aligned columns; ``right`` are the indexes of right-aligned ones."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = set(right)
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        yield "  ".join(cells).rstrip()


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


def _filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The selection options shared by ls, purge, verify and stats."""
    options = [
        click.option("--name", help="Job name, or a glob such as 'relax*'."),
        click.option("--function", help="Function path module:qualname, or a glob."),
        click.option("--since", type=_When(), help="Created at or after (date or age: 7d)."),
        click.option("--before", type=_When(), help="Created before (date or age: 30d)."),
        click.option("--invalid", is_flag=True, help="Only entries marked invalid."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _filters(
    name: str | None,
    function: str | None,
    since: datetime | None,
    before: datetime | None,
    invalid: bool,
    **more: Any,
) -> Filters:
    return Filters(
        name=name,
        function=function,
        since=since,
        before=before,
        invalid=True if invalid else None,
        **more,
    )


def _json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")(func)


# --------------------------------------------------------------------------- the group

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="cachetool")
@click.option(
    "--store",
    metavar="SPEC",
    help="Cache store: a YAML/JSON file or inline JSON maggma spec (like jobflow's JOB_STORE). "
    "Default: JOBFLOW_CACHE_STORE / the settings file / the embedded SQLite store.",
)
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
      cachetool --store ~/.jobflow-cache-mongo.yaml stats
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
@_json_option
def info(as_json: bool) -> None:
    """Where the cache lives and how many entries it holds.

    \b
    Examples:
      cachetool info
      cachetool info --json
    """
    cache = _cache()
    data = {
        "store": cache.name,
        "objects_dir": cache.objects_dir,
        "entries": cache.count(),
        "disabled": get_settings().DISABLE,
    }
    if as_json:
        _echo_json(data)
    else:
        for key, value in data.items():
            click.echo(f"{key:12} {value}")


# --------------------------------------------------------------------------- ls


def _row_cells(cache: CacheStore, row: Any) -> list[str]:
    files = f"{row.files} ({_size(row.files_size)})" if row.files else "-"
    return [
        short_digest(cache, row.digest),
        row.name,
        row.function,
        _when(row.created),
        _when(row.last_hit),
        str(row.hits),
        files,
        "yes" if row.valid else "NO",
    ]


_HEADER = ["DIGEST", "NAME", "FUNCTION", "CREATED", "LAST HIT", "HITS", "FILES", "VALID"]


@cli.command("ls")
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
    as_json: bool,
) -> None:
    """List cache entries, newest first.

    Columns: unique digest prefix, job name, function, created, last hit, hits, files (count
    and size), valid.

    \b
    Examples:
      cachetool ls
      cachetool ls --name 'relax*' --since 7d
      cachetool ls --function atomate2.vasp.jobs.core:RelaxMaker.make --sort hits
      cachetool ls --invalid --json
    """
    cache = _cache()
    criteria = _filters(name, function, since, before, invalid).criteria()
    rows = iter_rows(cache, criteria, sort=sort, descending=not reverse, limit=limit)
    if as_json:  # streamed: the same text as one json.dumps(indent=2) of the whole list
        opening = "["
        for row in rows:
            data = {**row.to_dict(), "short": short_digest(cache, row.digest)}
            text = json.dumps(data, indent=2, default=_json_default).replace("\n", "\n  ")
            click.echo(f"{opening}\n  {text}", nl=False)
            opening = ","
        click.echo("[]" if opening == "[" else "\n]")
        return
    shown = 0
    page: list[list[str]] = []
    for row in rows:
        page.append(_row_cells(cache, row))
        shown += 1
        if len(page) == _PAGE:
            for line in _table([_HEADER, *page], right=[5]):
                click.echo(line)
            page = []
    if page or not shown:
        if not shown:
            click.echo("No entries.", err=True)
            return
        for line in _table([_HEADER, *page], right=[5]):
            click.echo(line)
    if limit and shown == limit:
        click.echo(f"(first {limit} shown; --limit 0 shows all)", err=True)


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


def _argument_lines(entry: CacheEntry) -> list[str]:
    canonical = entry.canonical_input
    rows = []
    for name in sorted(entry.arg_digests):
        value = render(canonical[name], 70) if canonical and name in canonical else "(not kept)"
        rows.append([f"  {name}", entry.arg_digests[name][:12], value])
    return list(_table(rows)) if rows else ["  (no arguments)"]


def _show_text(entry: CacheEntry, cache: CacheStore, full: bool) -> Iterator[str]:
    yield f"digest         {entry.digest}"
    yield f"name           {entry.name}"
    yield f"function       {entry.function}"
    yield f"status         {_status(entry, cache)}"
    if not entry.valid:
        yield f"invalid        {entry.invalid_reason}"
    yield f"created        {_when(entry.created)}"
    yield f"hits           {entry.hits} (last {_when(entry.last_hit)})"
    note = "" if entry.canonical_input is not None else " (canonical input over the size cap)"
    yield f"inputs{note}:"
    yield from _argument_lines(entry)
    output = entry.output
    cut = not full and len(output) > _OUTPUT_CHARS
    yield f"output ({_size(len(output))}{', truncated; --full shows all' if cut else ''}):"
    yield "  " + (output[:_OUTPUT_CHARS] + " ..." if cut else output)
    if entry.response:
        kinds = ", ".join(sorted(json.loads(entry.response)))
        yield f"response       {kinds}{' (dynamic: makes new jobs)' if entry.dynamic else ''}"
    yield f"files          {len(entry.files)} ({_size(entry.files_size)})"
    rows = [[f"  {f.path}", _size(f.size), f.xxh3[:12], oct(f.mode)] for f in entry.files]
    if rows:
        yield from _table(rows, right=[1])
    for path, size in sorted(entry.files_skipped.items()):
        yield f"  {path}  {_size(size)}  not kept (over MAX_FILE_SIZE)"
    yield "provenance:"
    yield f"  source job   {entry.source_uuid} (index {entry.source_index})"
    yield f"  run folder   {entry.source_dir or '-'}"
    yield f"  host         {entry.host}"
    yield f"  python       {entry.python}"
    yield f"  duration     {_duration(entry.duration)}"
    yield f"  scheme       {entry.scheme}   cache version {entry.cache_version or '-'}"
    yield "  versions     " + ", ".join(f"{k} {v}" for k, v in sorted(entry.versions.items()))
    yield f"  checksum     {entry.checksum}"


@cli.command()
@click.argument("digest", type=PREFIX)
@click.option("--full", is_flag=True, help="Do not truncate the output.")
@_json_option
def show(digest: str, full: bool, as_json: bool) -> None:
    """Show one entry in full: inputs, output, files and provenance.

    \b
    Examples:
      cachetool show 3f2c1a9b
      cachetool show 3f2c1a9b --full
      cachetool show 3f2c1a9b --json
    """
    cache = _cache()
    doc = _find_document(cache, digest)
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
    for line in _show_text(entry, cache, full):
        click.echo(line)


# --------------------------------------------------------------------------- invalidate


@cli.command()
@click.argument("digests", type=PREFIX, nargs=-1, required=True)
@click.option("--reason", default="invalidated with cachetool", show_default=True)
def invalidate(digests: tuple[str, ...], reason: str) -> None:
    """Mark entries invalid: kept for inspection, never served (the job runs again).

    \b
    Examples:
      cachetool invalidate 3f2c1a9b
      cachetool invalidate 3f2c1a9b 77e0d2c4 --reason "wrong pseudopotentials"
    """
    cache = _cache()
    resolved = [resolve_prefix(cache, prefix) for prefix in digests]
    for full in resolved:
        cache.invalidate(full, reason)
        click.echo(f"invalidated {short_digest(cache, full)}: {reason}")


# --------------------------------------------------------------------------- purge and gc


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _objects_text(report: GCReport) -> str:
    """``2 file objects, 5.9 KiB`` (and what run folders still hold)."""
    total = report.bytes_freed + report.bytes_linked
    text = f"{_plural(report.objects, 'file object')}, {_size(total)}"
    if report.bytes_linked:
        text += f" ({_size(report.bytes_linked)} of it held by hard links in run folders)"
    return text


@cli.command("purge")
@_filter_options
@click.option("--older-than", type=_Age(), help="Created longer ago than this (30d, 12h).")
@click.option("--unused-for", type=_Age(), help="Not served for this long (never: since made).")
@click.option("--digest", "prefixes", type=PREFIX, multiple=True, help="This entry (repeatable).")
@click.option("--all", "everything", is_flag=True, help="Every entry.")
@click.option("--dry-run", is_flag=True, help="Show what would go; delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--no-gc", is_flag=True, help="Keep the file objects of removed entries.")
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
    as_json: bool,
) -> None:
    """Remove entries, then the file objects no remaining entry uses.

    Asks for confirmation unless --yes. Objects still used by any remaining entry (including
    entries marked invalid) are never deleted.

    \b
    Examples:
      cachetool purge --older-than 90d --dry-run
      cachetool purge --unused-for 30d --yes
      cachetool purge --function 'tests.jobs:*' --invalid
      cachetool purge --digest 3f2c1a9b
      cachetool purge --all --yes
    """
    cache = _cache()
    now = datetime.now(timezone.utc)
    if older_than is not None:
        cutoff = now - older_than
        before = cutoff if before is None else min(_aware(before), cutoff)
    digests = tuple(resolve_prefix(cache, prefix) for prefix in prefixes)
    unused = now - unused_for if unused_for is not None else None
    filters = _filters(name, function, since, before, invalid, unused_since=unused, digests=digests)
    if not filters and not everything:
        raise click.UsageError("say which entries: give a filter (see --help) or --all")
    if filters and everything:
        raise click.UsageError("--all cannot be combined with filters")
    criteria = filters.criteria()
    matching = cache.count(criteria)
    if not matching:
        if as_json:
            _echo_json(purge(cache, criteria, dry_run=True).to_dict())
        else:
            click.echo("No entries match.", err=True)
        return
    out = functools.partial(click.echo, err=as_json)
    rows = [_row_cells(cache, row) for row in iter_rows(cache, criteria, limit=10)]
    for line in _table([_HEADER, *rows], right=[5]):
        out(line)
    if matching > len(rows):
        out(f"... and {matching - len(rows)} more")
    if dry_run:
        report = purge(cache, criteria, dry_run=True, gc=not no_gc)
    else:
        if not yes:
            click.confirm(f"Remove {matching} entries?", abort=True, err=True)
        report = purge(cache, criteria, gc=not no_gc)
    if as_json:
        _echo_json(report.to_dict())
        return
    removed = _plural(report.entries, "entry", "entries")
    removed += " (file objects kept)" if no_gc else f" and {_objects_text(report.gc)}"
    click.echo(
        f"Dry run, nothing deleted: would remove {removed}" if dry_run else f"Removed {removed}"
    )


@cli.command()
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

    Exit status 0 only when everything checked is sound. --fix invalidates broken entries
    (undecodable and outdated-scheme ones are removed) and deletes corrupt file objects.
    Entries already marked invalid are not checked.

    \b
    Examples:
      cachetool verify
      cachetool verify --since 7d --quick
      cachetool verify --fix
      cachetool verify --json
    """
    cache = _cache()
    criteria = _filters(name, function, since, before, invalid).criteria()
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
    if as_json:
        _echo_json(
            {
                "checked": total,
                "sound": not problems,
                "broken_entries": len(broken),
                "problems": [p.to_dict() for p in problems],
            }
        )
    else:
        for line in _problem_lines(cache, problems):
            click.echo(line)
        verdict = "all sound"
        if problems:
            verdict = f"{_plural(len(problems), 'problem')} in "
            verdict += _plural(len(broken), "entry", "entries") + (" (fixed)" if fix else "")
        click.echo(f"Checked {_plural(total, 'entry', 'entries')}: {verdict}.")
    if problems:
        click.get_current_context().exit(1)


def _problem_lines(cache: CacheStore, problems: list[Problem]) -> Iterator[str]:
    for kind in ProblemKind:
        found = [p for p in problems if p.kind is kind]
        if not found:
            continue
        yield f"{kind.value} ({len(found)}):"
        for p in found:
            who = p.digest[:12] if p.digest else "cache"
            done = f"  [{p.fixed}]" if p.fixed else ""
            yield f"  {who}  {p.message}{done}"


# --------------------------------------------------------------------------- stats


@cli.command("stats")
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
    click.echo(f"entries        {result.entries} ({result.invalid} invalid)")
    click.echo(f"hits           {result.hits} ({_duration(result.time_saved)} of compute saved)")
    click.echo(f"file bytes     {_size(result.files_bytes)} named by manifests")
    click.echo(
        f"object area    {result.objects} objects, {_size(result.objects_bytes)} "
        f"(dedup ratio {result.dedup_ratio:.2f})"
    )
    click.echo(f"created        {_when(result.oldest)} .. {_when(result.newest)}")
    functions = list(result.functions.items())
    shown = functions[:top] if top else functions
    click.echo(f"functions      {len(functions)}" + (":" if shown else ""))
    for line in _table([[f"  {n}", f] for f, n in shown], right=[0]):
        click.echo(line)
    if len(shown) < len(functions):
        click.echo(f"  ... {len(functions) - len(shown)} more (--top 0 lists all)")


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
        yield f"{number}. {(comp.digest or '?')[:12]}  {comp.name}  created {_when(comp.created)}"
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
        lines.append(f"Entry {short}  {now.name}  {now.function}  created {_when(now.created)}")
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


def main() -> None:
    """Console-script entry point: errors are one line on stderr, exit status 1 (usage: 2)."""
    cli.main(prog_name="cachetool")
