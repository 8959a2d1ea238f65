"""Every code example in ``docs/`` runs, and prints what the page says it prints.

Conventions for pages (``docs/**/*.md``), in the order a reader meets them:

* a ````` ```python ````` block is run as ``python -c`` in a fresh process;
* a ````` ```text ````` block is the output of the nearest python block above it on the page;
* a ````` ```console ````` block is a shell session: each ``$ command`` (continued by a trailing
  ``\\``) runs in ``bash`` and the lines up to the next ``$`` are its expected stdout (stderr,
  where jobflow's and monty's deprecation warnings go, is not compared);
* a ````` ```bash ````` block is a script that must exit 0 (nothing is compared);
* ``<!-- file: NAME -->`` before a block writes the block to ``NAME`` instead of running it,
  so later commands on the page can run it (``$ python NAME``);
* ``<!-- skip: REASON -->`` before a block does not run it: it is reported as a skipped test
  with its reason (``pytest -ra`` lists them). Keep these few: a MongoDB server, a FireWorks
  LaunchPad, an install from the network.

All blocks of a page share one fresh folder, which is both the working directory and ``HOME``
(so ``~/.cache/jobflow-cache``, the default cache, and ``~/.jobflow-cache.yaml`` are the page's
own), with every ``JOBFLOW_CACHE_*`` variable removed and the running interpreter's ``bin``
first on ``PATH`` (``python`` and ``cachetool`` are the ones under test).

Output is compared with doctest's ``ELLIPSIS`` (``...`` matches anything) and whitespace
normalisation, after replacing, on both sides, what differs between any two runs: the page's
folder (shown as ``/home/me``), uuids, timestamps, run-folder names, hex digests of 12 or more
characters, and decimal numbers (timings). Integers are compared exactly: job counts,
entry counts and exit codes must be what the page says.
"""

from __future__ import annotations

import doctest
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCS = ROOT / "docs"
HOME = "/home/me"  # how a page shows its folder
TIMEOUT = 900

#: Modules of the ``docs`` extra the Sphinx build needs.
DOCS_PACKAGES = ("sphinx", "myst_parser", "furo", "sphinx_click")

#: At most this many blocks may be skipped across all pages (each needs a reason).
MAX_SKIPPED = 8

RUN_LANGS = {"python", "console", "bash"}
FENCE = re.compile(r"^(`{3,})([^`\s]*)(?:\s.*)?$")  # ```lang or ```{directive} args
COMMENT = re.compile(r"^<!--\s*(skip|file):\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int
    lang: str
    code: str
    skip: str | None = None
    file: str | None = None
    output: Block | None = None  # for python blocks: the text block that shows their output

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


def parse(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` with their ``skip``/``file`` marks and outputs."""
    blocks: list[Block] = []
    lines = page.read_text().splitlines()
    mark: tuple[str, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        comment = COMMENT.match(line)
        fence = FENCE.match(line)
        if comment:
            kind, value = comment.groups()
            if not value:
                raise AssertionError(f"{page}:{i + 1}: '{kind}:' needs a value")
            mark = (kind, value)
        elif fence:
            ticks, lang = fence.groups()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == ticks), None)
            if end is None:
                raise AssertionError(f"{page}:{i + 1}: unclosed code block")
            block = Block(page, i + 1, lang, "\n".join(lines[i + 1 : end]) + "\n")
            if mark:
                setattr(block, mark[0], mark[1])
                mark = None
            if lang == "text":
                owner = next((b for b in reversed(blocks) if b.lang == "python"), None)
                if owner is None or owner.output is not None or owner.file or owner.skip:
                    raise AssertionError(f"{block.where}: a text block must follow a python block")
                owner.output = block
            blocks.append(block)
            i = end
        elif line.strip():
            mark = None  # a mark applies to the block right below it only
        i += 1
    return blocks


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def runnable(page: Path) -> list[Block]:
    return [b for b in parse(page) if b.lang in RUN_LANGS or b.file]


PAGES = [p for p in pages() if runnable(p)]
SKIPPED = [b for p in pages() for b in parse(p) if b.skip]


# -- comparing output -----------------------------------------------------------------------------
VOLATILE = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d([.,]\d+)?)?(\+00:00)?"), "<time>"),
    (re.compile(r"job_[0-9-]+"), "job_<id>"),
    (re.compile(r"\b[0-9a-f]{12,}\b"), "<hex>"),
    (re.compile(r"\d+\.\d+"), "<decimal>"),
]


def normalize(text: str, home: Path) -> str:
    text = text.replace(str(home), HOME)
    for pattern, placeholder in VOLATILE:
        text = pattern.sub(placeholder, text)
    return text


def check_output(block: Block, expected: str, actual: str, home: Path) -> None:
    want, got = normalize(expected, home), normalize(actual, home)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    checker = doctest.OutputChecker()
    if not checker.check_output(want, got, flags):
        example = doctest.Example("", want)
        diff = checker.output_difference(example, got, flags | doctest.REPORT_UDIFF)
        raise AssertionError(f"{block.where}: output differs from the page\n{diff}")


# -- running --------------------------------------------------------------------------------------
def environment(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("JOBFLOW_CACHE_") and k not in {"XDG_CACHE_HOME", "PYTHONPATH"}
    }
    bin_dir = str(Path(sys.executable).parent)
    env.update(HOME=str(home), PATH=bin_dir + os.pathsep + env.get("PATH", ""), COLUMNS="100")
    return env


def run(args: list[str], block: Block, home: Path) -> str:
    proc = subprocess.run(
        args,
        cwd=home,
        env=environment(home),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{block.where}: exit code {proc.returncode}\n--- stdout\n{proc.stdout}"
            f"\n--- stderr\n{proc.stderr}"
        )
    return proc.stdout


def commands(session: str) -> list[tuple[str, str]]:
    """``(command, expected output)`` pairs of a console block."""
    pairs: list[tuple[str, list[str]]] = []
    lines = session.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("$ "):
            command = [lines[i][2:]]
            while command[-1].endswith("\\") and i + 1 < len(lines):
                i += 1
                command.append(lines[i].removeprefix("> "))
            pairs.append(("\n".join(command), []))
        elif pairs:
            pairs[-1][1].append(lines[i])
        elif lines[i].strip():
            raise AssertionError(f"console output before the first command: {lines[i]!r}")
        i += 1
    return [(cmd, "\n".join(out).strip("\n") + "\n") for cmd, out in pairs]


def run_block(block: Block, home: Path) -> None:
    if block.file:
        target = Path(block.file.replace("~", str(home), 1))
        target = target if target.is_absolute() else home / target
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.code)
    elif block.lang == "python":
        printed = run([sys.executable, "-c", block.code], block, home)
        if block.output is not None:
            check_output(block, block.output.code, printed, home)
    elif block.lang == "bash":
        run(["bash", "-e", "-c", block.code], block, home)
    elif block.lang == "console":
        for command, expected in commands(block.code):
            printed = run(["bash", "-e", "-c", command], block, home)
            check_output(block, expected, printed, home)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    blocks = runnable(page)
    needs_atomate2 = any("atomate2" in b.code for b in blocks if not b.skip)
    if needs_atomate2 and importlib.util.find_spec("atomate2") is None:
        pytest.skip(f"{page.name} runs atomate2 workflows (install the atomate2 extra)")
    home = tmp_path / "home"
    home.mkdir()
    for block in blocks:
        if not block.skip:
            run_block(block, home)


@pytest.mark.parametrize("block", SKIPPED, ids=[b.where for b in SKIPPED])
def test_skipped_example(block: Block) -> None:
    """Listed by ``pytest -ra``: which examples do not run here, and why."""
    pytest.skip(f"{block.where} not run: {block.skip}")


@pytest.mark.slow
def test_sphinx_build_passes_offline_with_warnings_as_errors(tmp_path: Path) -> None:
    """The site builds with ``-W`` (``.ci/run`` builds it too, with the ``docs`` extra)."""
    missing = [m for m in DOCS_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed (missing {', '.join(missing)})")
    out = tmp_path / "html"
    build = ["-W", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", *build],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "howto" / "resume.html").is_file()
    settings = (out / "reference" / "settings.html").read_text()
    assert "JOBFLOW_CACHE_MAX_FILE_SIZE" in settings, "the settings table is generated"


def test_skipped_examples_are_few_and_explained() -> None:
    assert len(SKIPPED) <= MAX_SKIPPED, [(b.where, b.skip) for b in SKIPPED]
    assert all(len(b.skip or "") > 8 for b in SKIPPED), "say why an example cannot run"


def test_the_pages_have_examples() -> None:
    """Guards the parser: a regression that finds no block would make every page pass."""
    names = {str(p.relative_to(DOCS)) for p in PAGES}
    assert {"getting-started.md", "concepts.md", "howto/resume.md"} <= names
    blocks = [b for p in PAGES for b in runnable(p) if not b.skip]
    assert sum(b.lang == "console" for b in blocks) >= 5
    assert sum(b.output is not None for b in blocks) >= 5


def test_parser_and_checker(tmp_path: Path) -> None:
    """The conventions above, on a page written here."""
    page = tmp_path / "example.md"
    text = (
        "<!-- file: x.py -->\n```python\nprint(1)\n```\n\n```python\nprint('a 1.5 s')\n```\n\n"
        "```text\na 2.0 s\n```\n\n<!-- skip: needs a server -->\n```bash\nfalse\n```\n\n"
        "```console\n$ echo 1 \\\n> 2\n1 2\n```\n"
    )
    page.write_text(text)
    blocks = parse(page)
    assert [(b.lang, b.file, b.skip) for b in blocks] == [
        ("python", "x.py", None),
        ("python", None, None),
        ("text", None, None),
        ("bash", None, "needs a server"),
        ("console", None, None),
    ]
    assert blocks[1].output is blocks[2]
    assert commands(blocks[4].code) == [("echo 1 \\\n2", "1 2\n")]
    home = Path("/tmp/somewhere")
    check_output(blocks[1], "a 2.0 s\n", "a 1.5 s\n", home)  # timings differ between runs
    with pytest.raises(AssertionError, match="differs"):
        check_output(blocks[1], "3 jobs\n", "4 jobs\n", home)  # counts must match
