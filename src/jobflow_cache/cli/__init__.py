"""``cachetool``: inspect, purge, verify and explain the jobflow-cache store from the command line.

Every command works on the configured cache store (``JOBFLOW_CACHE_*`` settings: the embedded
SQLite store by default) or on the one given with ``--store`` (before or after the command).
Tables are fitted to the terminal (``COLUMNS``), coloured on a terminal only (never with
``NO_COLOR``), and show times relative to now; ``--json`` prints only JSON on stdout, with
absolute times. Progress and messages go to stderr. Errors are one line on stderr with exit
status 1 (usage errors: 2); ``--debug`` shows tracebacks. No command creates a store: on a
fresh machine they say that nothing is cached yet.

==================  ========================================================================
module              what it holds
==================  ========================================================================
:mod:`.commands`    the group and every command
:mod:`.options`     opening the store (``--store`` specs, one-line errors), the filter
                    options and parameter types every command shares
:mod:`.output`      tables fitted to the terminal, human times and sizes, JSON
==================  ========================================================================
"""

from __future__ import annotations

from jobflow_cache.cli.commands import cli, main

__all__ = ["cli", "main"]
