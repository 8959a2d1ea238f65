"""Shared fixtures: an isolated cache folder, a fresh JobStore, and an execution counter."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.support import paths
from tests.support.pgserver import *  # noqa: F403  (PostgreSQL server fixtures)

ROOT = paths.ROOT
pythonpath = paths.pythonpath


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own embedded cache under tmp_path (never the user's cache) and an
    empty working folder: jobs run without ``create_folders`` write there, never in the
    repository (whose ``.venv`` holds tens of thousands of files in CI)."""
    for name in [n for n in os.environ if n.startswith("JOBFLOW_CACHE_")]:
        monkeypatch.delenv(name)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cache_dir = tmp_path / "jfc-cache"
    monkeypatch.setenv("JOBFLOW_CACHE_DIR", str(cache_dir))
    # an empty settings file: never the user's ~/.jobflow-cache.yaml (a named file must exist)
    config = tmp_path / "no-config.yaml"
    config.touch()
    monkeypatch.setenv("JOBFLOW_CACHE_CONFIG_FILE", str(config))
    # gc and purge delete unreferenced objects at once (tests/execution/test_gc_safety.py tests the
    # grace)
    monkeypatch.setenv("JOBFLOW_CACHE_GC_GRACE", "0")
    monkeypatch.delenv("JFC_FAIL", raising=False)
    return cache_dir


@pytest.fixture(autouse=True)
def process_state_restored():
    """Undo what a test's third-party code leaves in the process for the tests after it:
    jobflow-remote's Runner configures logging with ``disable_existing_loggers=True`` (the
    ``jobflow_cache`` and ``jobflow`` loggers then drop every record, so summaries and
    swallowed warnings go unseen), and jobflow's ``Job.run`` leaves ``CURRENT_JOB`` set when a
    job raises (a later direct call of a cached function would then take itself for a job)."""
    loggers = logging.root.manager.loggerDict
    disabled = {name for name, logger in loggers.items() if getattr(logger, "disabled", False)}
    yield
    from jobflow import CURRENT_JOB

    CURRENT_JOB.reset()
    for name, logger in list(loggers.items()):
        if isinstance(logger, logging.Logger) and logger.disabled and name not in disabled:
            logger.disabled = False


@pytest.fixture(autouse=True)
def no_swallowed_cache_warnings(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture):
    """Under filterwarnings=error a CacheWarning is logged rather than raised (the cache never
    fails a job), so an unexpected one would go unseen: fail the test on it instead. Tests
    that provoke one on purpose use ``@pytest.mark.warnings_logged``."""
    yield
    if request.node.get_closest_marker("warnings_logged") or not isinstance(
        request.node, pytest.Function
    ):  # doctests (errors.warn's example provokes one on purpose)
        return
    swallowed = [
        r.getMessage()
        for r in caplog.get_records("call")
        if getattr(r, "jfc_swallowed_warning", False)
    ]
    assert not swallowed, f"unexpected CacheWarning(s): {swallowed}"


class Counts:
    """Reads the executions written by tests/support/jobs.py (works across processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> Counter[str]:
        if not self.path.exists():
            return Counter()
        return Counter(self.path.read_text().split("\n")[:-1])

    def total(self) -> int:
        return sum(self().values())

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture
def counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Counts:
    path = tmp_path / "executions.txt"
    monkeypatch.setenv("JFC_COUNTS_FILE", str(path))
    return Counts(path)


@pytest.fixture
def job_store():
    from jobflow import JobStore
    from maggma.stores import MemoryStore

    store = JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})
    store.connect()
    return store


@pytest.fixture
def cache_store(tmp_path: Path):
    from jobflow_cache import CacheStore
    from jobflow_cache.backends import SQLiteBackend

    return CacheStore(SQLiteBackend(tmp_path / "cache.sqlite"), tmp_path / "objects")


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run folder, made the working directory."""
    path = tmp_path / "run"
    path.mkdir()
    monkeypatch.chdir(path)
    return path


def run_python(code: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run ``code`` in a fresh Python process (tests importable); return stdout, raise on error."""
    full_env = {**os.environ, "PYTHONPATH": pythonpath(), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout
