"""``cachetool``: inspect the jobflow-cache store from the command line."""

from __future__ import annotations

import json
import logging
import sys

import click

from jobflow_cache import __version__
from jobflow_cache.errors import CacheError
from jobflow_cache.settings import get_settings
from jobflow_cache.store import CacheStore

__all__ = ["cli", "main"]

logger = logging.getLogger(__name__)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cachetool")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Inspect the jobflow-cache store.

    \b
    Examples:
      cachetool info
      cachetool info --json
    """
    ctx.ensure_object(dict)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def info(as_json: bool) -> None:
    """Where the cache lives and how many entries it holds."""
    settings = get_settings()
    with CacheStore.from_settings(settings) as store:
        data = {
            "store": store.name,
            "objects_dir": store.objects_dir,
            "entries": store.count(),
            "disabled": settings.DISABLE,
        }
    if as_json:
        click.echo(json.dumps(data))
    else:
        for key, value in data.items():
            click.echo(f"{key:12} {value}")


def main() -> None:
    """Console-script entry point: CacheError -> one line on stderr, exit 1."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except CacheError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(1)
