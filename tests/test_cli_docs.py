"""docs/cli.md cannot rot: it shows every cachetool command, and its sessions are run.

``tests/test_docs.py`` runs every ``$`` line of every page in a fresh folder and compares the
printed output with the page (doctest ``...`` wildcards; uuids, digests of 12+ hex digits,
times, decimals and the page's folder may differ). These tests make sure docs/cli.md is one of
those pages, that every command of ``cachetool`` has a session there with output to compare,
and that the README's command-line section names only real commands and options.
"""

from __future__ import annotations

import re
import shlex

from click.testing import CliRunner

from jobflow_cache.cli import cli
from tests import test_docs
from tests.conftest import ROOT

PAGE = test_docs.DOCS / "cli.md"


def cachetool_lines(text: str) -> list[list[str]]:
    """The argument lists of the ``cachetool`` commands of a shell text."""
    found = []
    for line in text.splitlines():
        line = line.removeprefix("$ ").split("||")[0].split("|")[0].split("#")[0].strip()
        if line.startswith("cachetool "):
            found.append(shlex.split(line)[1:])
    return found


def subcommand(args: list[str]) -> str:
    return next(arg for arg in args if not arg.startswith("-") and arg in cli.commands)


def test_the_page_is_run_and_compared_by_test_docs():
    assert PAGE in test_docs.PAGES
    blocks = test_docs.runnable(PAGE)
    assert not [b.where for b in blocks if b.skip]


def test_every_command_has_a_session_with_output():
    sessions = [b for b in test_docs.parse(PAGE) if b.lang == "console"]
    pairs = [pair for block in sessions for pair in test_docs.commands(block.code)]
    shown: dict[str, int] = {}
    for command, expected in pairs:
        for args in cachetool_lines(command):
            name = subcommand(args)
            shown[name] = shown.get(name, 0) + len(expected.strip())
    assert set(shown) == set(cli.commands)
    assert all(shown[name] for name in cli.commands), shown  # each prints something to compare


def test_the_readme_section_uses_real_commands_and_options():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    assert "docs/cli.md" in section
    lines = cachetool_lines(section)
    assert len(lines) >= 3
    for args in lines:
        command = cli.commands[subcommand(args)]
        options = {opt for param in command.params for opt in param.opts}
        used = {arg for arg in args if re.fullmatch(r"--?[a-z][a-z-]*", arg)}
        assert used <= options, (args, used - options)
        result = CliRunner().invoke(cli, [*args, "--help"])
        assert result.exit_code == 0, result.output
