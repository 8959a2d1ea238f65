"""Shared fixtures: an isolated cache folder, a fresh JobStore, and an execution counter."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own embedded cache under tmp_path (never the user's cache)."""
    for name in [n for n in os.environ if n.startswith("JOBFLOW_CACHE_")]:
        monkeypatch.delenv(name)
    cache_dir = tmp_path / "jfc-cache"
    monkeypatch.setenv("JOBFLOW_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("JOBFLOW_CACHE_CONFIG_FILE", str(tmp_path / "no-config.yaml"))
    monkeypatch.delenv("JFC_FAIL", raising=False)
    return cache_dir


class Counts:
    """Reads the executions written by tests/jobs.py (works across processes)."""

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
    from jobflow_cache import CacheStore, SQLiteStore

    return CacheStore(SQLiteStore(tmp_path / "cache.sqlite", key="digest"), tmp_path / "objects")


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run folder, made the working directory."""
    path = tmp_path / "run"
    path.mkdir()
    monkeypatch.chdir(path)
    return path


def run_python(code: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run ``code`` in a fresh Python process (tests importable); return stdout, raise on error."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
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
