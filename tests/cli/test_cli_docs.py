"""docs/cli.md cannot rot: it shows every cachetool command, and its sessions are run.

``tests/test_docs.py`` runs every ``$`` line of every page in a fresh folder and compares the
printed output with the page (doctest ``...`` wildcards; uuids, digests of 12+ hex digits,
times, decimals and the page's folder may differ). These tests make sure docs/cli.md is one of
those pages, that every command of ``cachetool`` has a session there with output to compare,
and that the README's command-line section names only real commands and options.
"""

from __future__ import annotations

import html
import re
import shlex
import subprocess
import sys

import pytest
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
        line = re.sub(r"^(?:[A-Z_]+=\S*\s+)+", "", line)  # JOBFLOW_CACHE_X=1 cachetool ...
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


def test_the_rendered_check_fails_on_raw_directives_and_dashed_options():
    """docs/_ext/jfc_docs.py fails the build on what issue 12 saw rendered."""
    pytest.importorskip("sphinx")
    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    try:
        import jfc_docs
    finally:
        sys.path.remove(str(ROOT / "docs" / "_ext"))
    from docutils import nodes
    from docutils.utils import new_document
    from sphinx.errors import ExtensionError

    for text in (".. option:: --version", "cachetool ls \u2013limit 20"):
        doc = new_document("page")
        doc += nodes.paragraph("", "", nodes.Text(text))
        with pytest.raises(ExtensionError, match="the rendered page shows"):
            jfc_docs._check_rendered(None, doc, "page")
    doc = new_document("page")
    doc += nodes.paragraph("", "", nodes.Text("cachetool ls --limit 20, pages 3\u20134"))
    jfc_docs._check_rendered(None, doc, "page")


@pytest.mark.slow
def test_the_reference_page_renders_every_option(tmp_path):
    """Build the HTML site (warnings are errors) and read the command-line reference."""
    pytest.importorskip("sphinx_click")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", "-W", "-b", "html", "docs", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "reference" / "cli.html").read_text()
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    assert ".. option::" not in text
    assert ".. click::" not in text
    assert "\u2013" not in text
    for name, command in cli.commands.items():
        assert f'id="cachetool-{name}"' in page, name
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in text, (name, opt)
    assert "$ cachetool ls --name 'relax*' --since 7d" in text
