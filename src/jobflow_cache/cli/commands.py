"""The ``cachetool`` group and its commands: info, config, ls, show, invalidate, purge, gc,
verify, stats, explain and plan (the work itself is in :mod:`jobflow_cache.admin`)."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import click
from jobflow import Flow, Job
from maggma.core import Sort
from monty.serialization import loadfn
from pydantic import ValidationError
from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from jobflow_cache import __version__
from jobflow_cache.admin.explain import (
    Comparison,
    Inputs,
    job_from_file,
    job_inputs,
    job_outcome,
    nearest,
    open_job_store,
    render,
)
from jobflow_cache.admin.listing import (
    ROW_FIELDS,
    SORT_FIELDS,
    EntryRow,
    resolve_prefix,
    short_digest,
    stats,
)
from jobflow_cache.admin.purge import GCReport, collect_garbage, purge
from jobflow_cache.admin.verify import Problem, ProblemKind, verify
from jobflow_cache.backends.base import unreadable_reason
from jobflow_cache.cli import output as fmt
from jobflow_cache.cli.options import (
    PREFIX,
    STORE_HELP,
    Age,
    Group,
    State,
    any_filter,
    common_options,
    criteria_of,
    current_state,
    filter_options,
    first_line,
    json_option,
    load_spec,
    open_cache,
)
from jobflow_cache.cli.output import Column
from jobflow_cache.codec import UUID_RE
from jobflow_cache.entry import CacheEntry
from jobflow_cache.errors import CacheError
from jobflow_cache.execution.cache import Cache
from jobflow_cache.files import ObjectArea
from jobflow_cache.hashing.canonical import SCHEME
from jobflow_cache.plan import MANAGERS, Plan
from jobflow_cache.plan import plan as plan_flow
from jobflow_cache.settings import config_file, setting_sources
from jobflow_cache.store import CacheStore, Outcome

__all__ = ["cli", "main"]

logger = logging.getLogger(__name__)

_PAGE = 200
_OUTPUT_LINES = 40


# --------------------------------------------------------------------------- the group

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="cachetool")
@click.option("--store", metavar="SPEC", help=STORE_HELP)
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
@common_options
@json_option
def info(as_json: bool) -> None:
    """Where the cache lives and how many entries it holds.

    \b
    Examples:
      cachetool info
      cachetool info --json
    """
    state = current_state()
    cache = state.cache()
    data = {
        "store": state.location,
        "exists": state.missing is None,
        "objects_dir": cache.objects_dir,
        "entries": cache.count(),
        "disabled": state.settings().DISABLE,
    }
    if as_json:
        fmt.echo_json(data)
        return
    for key, value in data.items():  # plain lines: paths are never cut, they get copied
        if key != "exists":
            click.echo(f"{key:12} {value}")


# --------------------------------------------------------------------------- config


@cli.command()
@json_option
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
        fmt.echo_json(
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
    out = fmt.console()
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
        "created": lambda: Text(fmt.ago(row.created, now)),
        "last-hit": lambda: Text(fmt.ago(row.last_hit, now), style="green" if row.hits else "dim"),
        "hits": lambda: Text(str(row.hits), style="bold green" if row.hits else "dim"),
        "files": lambda: Text(
            f"{row.files} ({fmt.size(row.files_size)})" if row.files else "-",
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
        table, fitted = fmt.table(spec, page, widths, header=widths is None)
        if widths is None:
            widths = fitted
            dropped = [c.header for c, w in zip(spec, fitted) if w is None]
        else:
            dropped = []
        fmt.emit(out, table)
        if dropped:
            fmt.note(f"({', '.join(dropped)} left out to fit {out.width} columns; see --columns)")

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
@common_options
@filter_options
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
@json_option
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
    cache = open_cache()
    criteria = criteria_of(name, function, since, before, invalid)
    rows = _rows(cache, criteria, sort, reverse, limit)
    # closed while the store is open, also when the reader of a pipe has gone (| head)
    click.get_current_context().call_on_close(rows.close)
    if as_json:  # streamed: the same text as one json.dumps(indent=2) of the whole list
        opening = "["
        for item in rows:
            data = {**item.row.to_dict(), "maker": item.maker, "short": item.short}
            text = json.dumps(data, indent=2, default=fmt.json_default).replace("\n", "\n  ")
            click.echo(f"{opening}\n  {text}", nl=False)
            opening = ","
        click.echo("[]" if opening == "[" else "\n]")
        return
    shown = _print_rows(rows, columns, fmt.console())
    if not shown:
        if current_state().missing is None:
            fmt.note("No entries.")
        return
    if limit and shown == limit:
        fmt.note(f"(first {limit} shown; --limit 0 shows all)")


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
    out = fmt.console()
    status = _status(entry, cache)
    head = [
        ("digest", Text(entry.digest, style="yellow")),
        ("name", Text(entry.name)),
        ("function", Text(entry.function)),
        ("maker", Text(maker or "-")),
        ("status", Text(status, style="green" if status == "served on a hit" else "bold red")),
        ("created", Text(fmt.when_ago(entry.created))),
        ("hits", Text(f"{entry.hits} (last {fmt.when_ago(entry.last_hit)})")),
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
    fmt.emit(out, Panel(inputs, title=f"inputs{note}", title_align="left", expand=False))

    text = _pretty(entry.output)
    lines = text.splitlines()
    cut = not full and len(lines) > _OUTPUT_LINES
    if cut:
        text = "\n".join(lines[:_OUTPUT_LINES])
    title = f"output ({fmt.size(len(entry.output))})"
    subtitle = f"{len(lines) - _OUTPUT_LINES} more lines: --full shows all" if cut else None
    body = Syntax(text, "json", word_wrap=True, theme="ansi_dark", background_color="default")
    fmt.emit(out, Panel(body, title=title, title_align="left", subtitle=subtitle, expand=False))
    if entry.response:
        kinds = ", ".join(sorted(json.loads(entry.response)))
        dynamic = " (dynamic: makes new jobs)" if entry.dynamic else ""
        fmt.emit(out, Text.assemble(("response  ", "bold"), f"{kinds}{dynamic}"))

    files = Table(box=None, pad_edge=False, show_header=False, padding=(0, 1))
    files.add_column(overflow="fold")
    files.add_column(justify="right", no_wrap=True)
    files.add_column(style="dim", no_wrap=True)
    files.add_column(style="dim", no_wrap=True)
    for f in entry.files:
        files.add_row(f.path, fmt.size(f.size), f.xxh3[:12], oct(f.mode))
    for path, size in sorted(entry.files_skipped.items()):
        files.add_row(path, fmt.size(size), "not kept", "(over MAX_FILE_SIZE)")
    if entry.files or entry.files_skipped:
        title = f"files: {len(entry.files)} ({fmt.size(entry.files_size)})"
        fmt.emit(out, Panel(files, title=title, title_align="left", expand=False))
    else:
        fmt.emit(out, Text.assemble(("files  ", "bold"), "none"))

    versions = ", ".join(f"{k} {v}" for k, v in sorted(entry.versions.items()))
    fmt.emit(out, Text("provenance", style="bold"))
    for key, text in (  # plain lines: paths are never cut, they get copied
        ("source job", f"{entry.source_uuid} (index {entry.source_index})"),
        ("run folder", entry.source_dir or "-"),
        ("host", entry.host),
        ("python", entry.python),
        ("duration", fmt.duration(entry.duration)),
        ("scheme", entry.scheme),
        ("cache version", entry.cache_version or "-"),
        ("versions", versions or "-"),
        ("checksum", entry.checksum),
    ):
        click.echo(f"  {key:13} {text}")


@cli.command()
@common_options
@click.argument("digest", type=PREFIX)
@click.option("--full", is_flag=True, help="Do not shorten the output.")
@json_option
def show(digest: str, full: bool, as_json: bool) -> None:
    """Show one entry in full: inputs, output (indented JSON), files and provenance.

    \b
    Examples:
      cachetool show 3f2c1a9b
      cachetool show 3f2c1a9b --full
      cachetool show 3f2c1a9b --json
    """
    cache = open_cache()
    doc = _find_document(cache, digest)
    maker = doc.get("maker") if isinstance(doc.get("maker"), str) else None
    unreadable = unreadable_reason(doc)
    if unreadable is not None:  # a damaged row: said in one line, never a traceback
        if as_json:
            fmt.echo_json({"digest": doc.get("digest"), "status": f"unreadable: {unreadable}"})
            return
        raise CacheError(
            f"entry {doc.get('digest')} is unreadable: {unreadable} "
            "(`cachetool verify --fix` removes it; the job then records a sound entry)"
        )
    try:
        entry = CacheEntry.from_document(doc)
    except (ValidationError, TypeError, ValueError) as err:
        if as_json:
            fmt.echo_json({**doc, "status": f"does not decode: {first_line(err)}"})
            return
        click.echo(json.dumps(doc, indent=2, default=fmt.json_default))
        raise CacheError(f"entry {doc.get('digest')} does not decode: {first_line(err)}") from err
    if as_json:
        fmt.echo_json({**entry.model_dump(mode="json"), "status": _status(entry, cache)})
        return
    _show(entry, cache, full, maker)


# --------------------------------------------------------------------------- invalidate


_CASCADE_HELP = (
    "Leave the entries that consumed these (their jobs used these outputs) as they are. By "
    "default they go too: a result computed from a wrong one is wrong as well."
)


def _show_dependents(cache: CacheStore, dependents: list[str], out: Console, verb: str) -> None:
    """The entries a cascade reaches (the first 10 as a table)."""
    fmt.emit(out, Text(f"{verb} too, because they consumed these (--no-cascade leaves them):"))
    criteria = {"digest": {"$in": dependents[:10]}}
    _print_rows(_rows(cache, criteria, "created", False, 10), DEFAULT_COLUMNS, out)
    if len(dependents) > 10:
        fmt.emit(out, f"... and {len(dependents) - 10} more")


@cli.command()
@common_options
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
    cache = open_cache()
    resolved = list(dict.fromkeys(resolve_prefix(cache, prefix) for prefix in digests))
    dependents = [] if no_cascade else cache.dependents(resolved)
    if dependents:
        _show_dependents(cache, dependents, fmt.console(err=True), "Invalidated")
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
    text = f"{fmt.plural(report.objects, 'file object')}, {fmt.size(total)}"
    if report.bytes_linked:
        text += f" ({fmt.size(report.bytes_linked)} of it held by hard links in run folders)"
    return text


@cli.command("purge")
@common_options
@filter_options
@click.option("--older-than", type=Age(), help="Created longer ago than this (30d, 12h).")
@click.option("--unused-for", type=Age(), help="Not served for this long (never: since made).")
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
@json_option
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
      cachetool purge --function 'tests.support.jobs:*' --invalid
      cachetool purge --digest 3f2c1a9b
      cachetool purge --outdated --yes
      cachetool purge --all --yes
    """
    chosen = (name, function, since, before, invalid, older_than, unused_for, prefixes, outdated)
    if not any_filter(*chosen):
        if not everything:
            raise click.UsageError("say which entries: give a filter (see --help) or --all")
    elif everything:
        raise click.UsageError("--all cannot be combined with filters")
    cache = open_cache()
    now = datetime.now(timezone.utc)
    if older_than is not None:
        cutoff = now - older_than
        before = cutoff if before is None else min(fmt.aware(before), cutoff)
    digests = tuple(resolve_prefix(cache, prefix) for prefix in prefixes)
    unused = now - unused_for if unused_for is not None else None
    criteria = criteria_of(
        name, function, since, before, invalid, unused_since=unused, digests=digests
    )
    options = {"gc": not no_gc, "cascade": not no_cascade, "outdated_schemes": outdated}
    preview = purge(cache, criteria, dry_run=True, **options)
    if not preview.entries:
        if as_json:
            fmt.echo_json(preview.to_dict())
        else:
            fmt.note("No entries match.")
        return
    listed = criteria
    if outdated:
        old_scheme = {"scheme": {"$ne": SCHEME}}
        listed = {"$and": [criteria, old_scheme]} if criteria else old_scheme
    matching = preview.entries - len(preview.cascaded)
    out = fmt.console(err=as_json)
    _print_rows(_rows(cache, listed, "created", False, 10), DEFAULT_COLUMNS, out)
    if matching > 10:
        fmt.emit(out, f"... and {matching - 10} more")
    if preview.cascaded:
        _show_dependents(cache, preview.cascaded, out, "Removed")
    if dry_run:
        report = preview
    else:
        if not yes:
            click.confirm(f"Remove {preview.entries} entries?", abort=True, err=True)
        report = purge(cache, criteria, **options)
    if as_json:
        fmt.echo_json(report.to_dict())
        return
    removed = fmt.plural(report.entries, "entry", "entries")
    removed += " (file objects kept)" if no_gc else f" and {_objects_text(report.gc)}"
    click.echo(
        f"Dry run, nothing deleted: would remove {removed}" if dry_run else f"Removed {removed}"
    )


@cli.command()
@common_options
@click.option("--dry-run", is_flag=True, help="Count only; delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
def gc(dry_run: bool, yes: bool, as_json: bool) -> None:
    """Delete file objects that no entry references (left by crashes or --no-gc).

    \b
    Examples:
      cachetool gc --dry-run
      cachetool gc --yes
    """
    cache = open_cache()
    report = collect_garbage(cache, dry_run=True)
    if not dry_run and report.objects:
        if not yes:
            click.confirm(
                f"Delete {report.objects} unreferenced file objects?", abort=True, err=True
            )
        report = collect_garbage(cache)
    if as_json:
        fmt.echo_json(report.to_dict())
    else:
        click.echo(f"{'Would delete' if dry_run else 'Deleted'} {_objects_text(report)}")


# --------------------------------------------------------------------------- verify


@cli.command("verify")
@common_options
@filter_options
@click.option("--limit", "-n", default=0, help="Check at most this many entries (0: all).")
@click.option("--quick", is_flag=True, help="Compare file sizes only; do not re-hash files.")
@click.option("--fix", is_flag=True, help="Invalidate (or remove) broken entries.")
@json_option
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
    cache = open_cache()
    criteria = criteria_of(name, function, since, before, invalid)
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
        fmt.echo_json(
            {
                "checked": total,
                "sound": not problems,
                "fixed": bool(problems) and not unfixed,
                "broken_entries": len(broken),
                "problems": [p.to_dict() for p in problems],
            }
        )
    else:
        out = fmt.console()
        for line in _problem_lines(problems):
            fmt.emit(out, line)
        checked = f"Checked {fmt.plural(total, 'entry', 'entries')}: "
        if not problems:
            fmt.emit(out, Text(checked + "all sound.", style="green"))
        else:
            found = f"{fmt.plural(len(problems), 'problem')} in "
            found += fmt.plural(len(broken), "entry", "entries")
            if fix and not unfixed:
                fmt.emit(out, Text(f"{checked}{found}, all fixed.", style="yellow"))
            elif fix:
                fmt.emit(out, Text(f"{checked}{found}, {len(unfixed)} not fixed.", style="red"))
            else:
                fmt.emit(out, Text(f"{checked}{found}.", style="red"))
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
@common_options
@click.option("--top", default=10, show_default=True, help="Functions listed (0: all).")
@json_option
def stats_command(top: int, as_json: bool) -> None:
    """Entries, hits, time saved, file sizes, deduplication and entries per function.

    \b
    Examples:
      cachetool stats
      cachetool stats --top 0 --json
    """
    result = stats(open_cache())
    if as_json:
        fmt.echo_json(result.to_dict())
        return
    out = fmt.console()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    invalid = Text(f" ({result.invalid} invalid)", style="red" if result.invalid else "")
    grid.add_row("entries", Text.assemble(str(result.entries), invalid))
    grid.add_row("hits", f"{result.hits} ({fmt.duration(result.time_saved)} of compute saved)")
    grid.add_row("file bytes", f"{fmt.size(result.files_bytes)} named by manifests")
    grid.add_row(
        "object area",
        f"{result.objects} objects, {fmt.size(result.objects_bytes)} "
        f"(dedup ratio {result.dedup_ratio:.2f})",
    )
    created = (
        "-" if result.oldest is None else f"{fmt.ago(result.oldest)} .. {fmt.ago(result.newest)}"
    )
    grid.add_row("created", created)
    functions = list(result.functions.items())
    shown = functions[:top] if top else functions
    grid.add_row("functions", str(len(functions)))
    fmt.emit(out, grid)
    if shown:
        columns = [Column("ENTRIES", justify="right"), Column("FUNCTION", flex=True)]
        fmt.print_table(columns, [[Text(str(n)), Text(f)] for f, n in shown], out)
    if len(shown) < len(functions):
        fmt.emit(out, f"... {len(functions) - len(shown)} more (--top 0 lists all)")


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
        yield f"{number}. {(comp.digest or '?')[:12]}  {comp.name}  created {fmt.ago(comp.created)}"
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
@common_options
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
@json_option
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
    cache = open_cache()
    spec = load_spec(jobstore) if jobstore else None
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
        lines.append(f"Entry {short}  {now.name}  {now.function}  created {fmt.ago(now.created)}")
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
        fmt.echo_json(data)
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
@common_options
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
@json_option
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
    cache = open_cache()
    job_store = open_job_store(load_spec(jobstore)) if jobstore else None
    result = plan_flow(flow, cache=Cache(cache), job_store=job_store, manager=manager)
    if as_json:
        fmt.echo_json(result.to_dict())
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
        fmt.print_table(columns, rows)
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
