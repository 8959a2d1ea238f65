"""How ``cachetool`` prints: rich consoles fitted to the terminal, tables that shorten or drop
columns to fit, human times and sizes, and JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = [
    "GAP",
    "Column",
    "ago",
    "aware",
    "console",
    "duration",
    "echo_json",
    "emit",
    "fit",
    "json_default",
    "note",
    "plural",
    "print_table",
    "size",
    "table",
    "when",
    "when_ago",
]


# --------------------------------------------------------------------------- output


def console(err: bool = False) -> Console:
    """A rich console on the current stdout/stderr: width from the terminal or ``COLUMNS``
    (80 when neither says), colour on a terminal only and never with ``NO_COLOR``."""
    return Console(stderr=err, highlight=False, soft_wrap=False, emoji=False)


def emit(out: Console, renderable: Any) -> None:
    """Print ``renderable``; off a terminal without the padding rich leaves at line ends."""
    if out.is_terminal:
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    click.echo(text, err=out.stderr)


def note(text: str) -> None:
    """A message on stderr (dim on a terminal)."""
    console(err=True).print(Text(text, style="dim"), soft_wrap=True)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=json_default))


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return aware(value).isoformat()
    return str(value)


def aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def when(value: Any) -> str:
    """Absolute local time, to the second (``-`` for never)."""
    if not isinstance(value, datetime):
        return "-"
    return aware(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def ago(value: Any, now: datetime | None = None) -> str:
    """Time relative to now: ``just now``, ``12 min ago``, ``3 h ago``, ``5 d ago``; a date
    after 60 days (``-`` for never).

    Examples
    --------
    >>> from datetime import timedelta
    >>> now = datetime(2026, 1, 31, 12, tzinfo=timezone.utc)
    >>> [ago(now - timedelta(seconds=s), now) for s in (5, 600, 3 * 3600, 5 * 86400)]
    ['just now', '10 min ago', '3 h ago', '5 d ago']
    """
    if not isinstance(value, datetime):
        return "-"
    now = now or datetime.now(timezone.utc)
    seconds = (now - aware(value)).total_seconds()
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    if seconds < 60 * 86400:
        return f"{int(seconds // 86400)} d ago"
    return aware(value).astimezone().strftime("%Y-%m-%d")


def when_ago(value: Any) -> str:
    """``2026-01-31 12:00:00 (3 h ago)``."""
    return "-" if not isinstance(value, datetime) else f"{when(value)} ({ago(value)})"


def size(n: int | float) -> str:
    """Human-readable bytes (``19 B``, ``1.2 KiB``)."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


@dataclass(frozen=True)
class Column:
    """A table column: ``flex`` columns are shortened (with ``…``) before others are dropped."""

    header: str
    justify: str = "left"
    flex: bool = False
    min_width: int = 6


GAP = 2  # spaces between columns


def fit(columns: list[Column], rows: list[list[Text]], width: int) -> list[int | None]:
    """Column widths that fit ``width``: flexible columns are shortened from the right, then
    columns are dropped from the right (``None``) until the table fits."""
    natural = [
        max([len(col.header), *(row[i].cell_len for row in rows)]) for i, col in enumerate(columns)
    ]
    widths: list[int | None] = list(natural)

    def total() -> int:
        shown = [w for w in widths if w is not None]
        return sum(shown) + GAP * (len(shown) - 1)

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


def table(
    columns: list[Column],
    rows: list[list[Text]],
    widths: list[int | None] | None = None,
    header: bool = True,
) -> tuple[Table, list[int | None]]:
    """A borderless table fitted to the console (see :func:`fit`)."""
    term = console()
    widths = widths or fit(columns, rows, term.width)
    grid = Table(
        box=None,
        pad_edge=False,
        show_edge=False,
        padding=(0, GAP // 2),
        show_header=header,
        header_style="bold",
        expand=False,
    )
    for col, width in zip(columns, widths):
        if width is not None:
            grid.add_column(
                col.header,
                justify=col.justify,  # type: ignore[arg-type]
                width=width,
                no_wrap=True,
                overflow="ellipsis",
            )
    for row in rows:
        grid.add_row(*(cell for cell, width in zip(row, widths) if width is not None))
    return grid, widths


def print_table(columns: list[Column], rows: list[list[Text]], out: Console | None = None) -> None:
    grid, widths = table(columns, rows)
    emit(out or console(), grid)
    dropped = [col.header for col, w in zip(columns, widths) if w is None]
    if dropped:
        note(f"({', '.join(dropped)} left out to fit {console().width} columns; see --columns)")
