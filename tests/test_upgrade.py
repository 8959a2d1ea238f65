"""A cache written by the release before the fixed-schema backend keeps working.

``tests/data/cache-v0.1.0-flow/`` is an embedded cache (``cache.sqlite`` in the old
``SQLiteStore`` format, and its object area) that commit 274cc42 wrote by running
``tests.upgrade_jobs.build()`` with ``run_locally(create_folders=True)``; one entry was then
copied under the older hash scheme ``jfc1``. Here the current code opens a copy of it: the
same flow, rebuilt in a fresh process, is served whole (nothing runs, the note file is placed
in the new run folder), and the CLI lists, verifies and purges it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobflow_cache.cli import cli
from tests.conftest import run_python

FIXTURE = Path(__file__).parent / "data" / "cache-v0.1.0-flow"

RUN = """
import json
from jobflow import JobStore
from maggma.stores import MemoryStore
from jobflow_cache import run_locally
from tests import upgrade_jobs as uj
flow = uj.build()
responses = run_locally(flow, store=JobStore(MemoryStore()), root_dir="runs",
                        create_folders=True, log=False, ensure_success=True)
print(json.dumps([responses[job.uuid][1].output for job in flow.jobs]))
"""


@pytest.fixture
def old_cache(isolated_cache: Path) -> Path:
    """A copy of the old cache, as the embedded default of this test."""
    shutil.copytree(FIXTURE, isolated_cache)
    return isolated_cache


def cachetool(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def test_a_flow_is_served_from_a_cache_of_the_earlier_release(old_cache, counts) -> None:
    out = json.loads(run_python(RUN, cwd=Path.cwd()))
    assert counts() == {}, "every job must be served from the migrated cache"
    square3, square4, note, total = out
    assert (square3, square4, total) == (9, 16, 25)
    assert note["value"] == 9
    placed = Path(note["note"])
    assert placed.is_relative_to(Path.cwd() / "runs"), "the path names the new run folder"
    assert placed.read_text() == "value=9\n"
    # the old table is gone: the file holds the fixed schema now
    info = json.loads(cachetool("info", "--json"))
    assert info["entries"] == 5


def test_the_cli_lists_verifies_and_purges_a_cache_of_the_earlier_release(old_cache) -> None:
    rows = json.loads(cachetool("ls", "--json"))
    assert sorted(row["name"] for row in rows) == [
        "square",
        "square",
        "square",
        "total",
        "write_note",
    ]
    found = CliRunner().invoke(cli, ["verify", "--json"])
    report = json.loads(found.stdout)
    problems = report["problems"] if isinstance(report, dict) else report
    assert [p["digest"] for p in problems] == ["f" * 32], "only the jfc1 entry is outdated"
    cachetool("purge", "--outdated", "--yes")
    assert len(json.loads(cachetool("ls", "--json"))) == 4
    after = json.loads(CliRunner().invoke(cli, ["verify", "--json"]).stdout)
    assert not (after["problems"] if isinstance(after, dict) else after)


def test_an_entry_of_an_earlier_hash_scheme_is_a_clean_miss(old_cache, counts) -> None:
    """Only the current scheme's digests are looked up: the jfc1 copy of square(3) is never
    found (no warning, nothing served from it); the jfc2 entries serve the flow."""
    run_python(RUN, cwd=Path.cwd())
    assert counts() == {}
    rows = {row["digest"]: row for row in json.loads(cachetool("ls", "--json"))}
    assert rows["f" * 32]["hits"] == 0
    assert sum(row["hits"] for row in rows.values()) == 4
