"""Bookkeeping (issue 11, class 6): what is recorded, when, and what a run may change.

* an entry is written only once jobflow has accepted (stored) the job's output;
* ``expose_store=True`` jobs are not cached unless ``cache_exposed_store`` opts them in;
* ``run_locally`` never changes a ``Cache`` it is given, and what it knows of its folders wins
  over ``JOBFLOW_CACHE_EXCLUSIVE_DIRS``;
* ``DISABLE: true`` in the settings file works exactly as ``JOBFLOW_CACHE_DISABLE=1``;
* relative cache paths are resolved once, where the run starts.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import jobflow
import pytest
from jobflow import Flow, JobStore
from maggma.stores import MemoryStore

from jobflow_cache import Cache, CacheStore, run_locally
from jobflow_cache.execution.cache import EXPOSED_STORE_REASON, META_KEY
from jobflow_cache.execution.claims import coordinator_of
from tests.conftest import run_python
from tests.support import jobs
from tests.support import provenance_jobs as pj


def fresh_store() -> JobStore:
    store = JobStore(MemoryStore())
    store.connect()
    return store


def outcome(job) -> str | None:
    meta = job.metadata.get(META_KEY)
    return None if meta is None else meta.get("outcome")


# -- 1. written only after jobflow accepted the output -------------------------------------------
def test_an_output_jobflow_refuses_is_never_recorded(counts, cache_store):
    for _ in range(2):
        j = pj.huge(1)
        responses = run_locally(j, store=fresh_store(), cache=cache_store, log=False)
        assert responses == {}, "jobflow's MemoryStore refuses an int over 64 bits: job failed"
        assert outcome(j) == "miss", "never reported as a hit"
    assert counts() == Counter(huge=2)
    cache_store.connect()
    assert cache_store.count() == 0


def test_an_accepted_output_is_recorded_after_it_is_stored(counts, cache_store):
    """The same flow with a job jobflow accepts: recorded (once its output is stored)."""
    for _ in range(2):
        flow = Flow([pj.huge(1), pj.plain(2)])
        run_locally(flow, store=fresh_store(), cache=cache_store, log=False)
    assert counts() == Counter(huge=2, plain=1)
    cache_store.connect()
    assert [d["name"] for d in cache_store.find({}, properties=["name"])] == ["plain"]


def test_with_dedup_the_claim_is_let_go_once_the_output_is_stored(counts, cache_store, monkeypatch):
    monkeypatch.setenv("JOBFLOW_CACHE_DEDUP", "1")
    cache = Cache(cache_store)
    refused, accepted = pj.huge(3), pj.plain(3)
    run_locally(Flow([refused, accepted]), store=fresh_store(), cache=cache, log=False)
    claims = coordinator_of(cache_store)
    assert claims is not None
    for j in (refused, accepted):  # free: another worker takes it at once
        assert claims.claim(j.metadata[META_KEY]["digest"], "other", 60) == "other"
    again = pj.plain(3)
    run_locally(again, store=fresh_store(), cache=cache, log=False)
    assert outcome(again) == "hit"
    assert counts() == Counter(huge=1, plain=1)


def test_cached_job_under_jobflow_records_no_output_jobflow_refuses(counts, isolated_cache):
    for _ in range(2):
        j = pj.huge_cached(5)
        assert jobflow.run_locally(j, store=fresh_store(), log=False) == {}
        assert outcome(j) == "miss"
    assert counts() == Counter(huge_cached=2)
    store = CacheStore.from_settings()
    store.connect()
    assert store.count() == 0


# -- 2. expose_store ----------------------------------------------------------------------------
def test_a_job_reading_the_job_store_is_not_cached(counts, cache_store):
    for _ in range(2):
        j = pj.reads_store(1)
        out = run_locally(j, store=fresh_store(), cache=cache_store, log=False)
        assert out[j.uuid][1].output == 1
        assert j.metadata[META_KEY] == {"outcome": "uncacheable", "reason": EXPOSED_STORE_REASON}
    assert counts() == Counter(reads_store=2)  # and no CacheWarning (conftest fails on one)
    cache_store.connect()
    assert cache_store.count() == 0


def test_cache_exposed_store_opts_in(counts, cache_store):
    outcomes = []
    for _ in range(2):
        j = pj.reads_store(1)
        j.update_metadata({META_KEY: {"cache_exposed_store": True}})
        run_locally(j, store=fresh_store(), cache=cache_store, log=False)
        outcomes.append(outcome(j))
    assert outcomes == ["miss", "hit"]
    assert counts() == Counter(reads_store=1)


# -- 3. run_locally and the Cache it is given ----------------------------------------------------
def test_run_locally_never_changes_the_cache_it_is_given(counts, cache_store, tmp_path):
    cache = Cache(cache_store, files="copy")
    first = pj.folder_knowledge("a")
    run_locally(
        first, cache=cache, create_folders=True, root_dir=tmp_path / "own", files="none", log=False
    )
    assert (cache.exclusive_dirs, cache.files) == (False, "copy")
    assert first.metadata[META_KEY]["outcome"] == "miss"
    later = pj.folder_knowledge("b")
    out = run_locally(later, cache=cache, root_dir=tmp_path / "shared", log=False)
    assert out[later.uuid][1].output == {"tag": "b", "exclusive": False, "shared": False}


def test_a_runs_own_folders_win_over_exclusive_dirs(counts, cache_store, tmp_path, monkeypatch):
    """JOBFLOW_CACHE_EXCLUSIVE_DIRS=1 says every job has a folder of its own; a run of
    run_locally(create_folders=False) knows better: its jobs share one."""
    monkeypatch.setenv("JOBFLOW_CACHE_EXCLUSIVE_DIRS", "1")
    cache = Cache(cache_store)
    shared_root, own_root = tmp_path / "shared", tmp_path / "own"
    shared = pj.folder_knowledge("s")
    out = run_locally(shared, cache=cache, root_dir=shared_root, log=False)
    assert out[shared.uuid][1].output == {"tag": "s", "exclusive": False, "shared": False}
    own = pj.folder_knowledge("o")
    out = run_locally(own, cache=cache, create_folders=True, root_dir=own_root, log=False)
    assert out[own.uuid][1].output == {"tag": "o", "exclusive": True, "shared": True}
    claims = coordinator_of(cache_store)
    assert claims is not None
    (job_dir,) = own_root.iterdir()
    known = claims.get_aliases([str(shared_root.resolve()), str(job_dir.resolve())])
    assert list(known) == [str(job_dir.resolve())], "the shared folder is no job's folder"


# -- 4. DISABLE in the settings file ---------------------------------------------------------------
@pytest.fixture
def disabled_by_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "settings.yaml"
    config.write_text("DISABLE: true\n")
    monkeypatch.setenv("JOBFLOW_CACHE_CONFIG_FILE", str(config))
    return config


def test_disable_in_the_settings_file_under_run_locally(counts, disabled_by_file, isolated_cache):
    for _ in range(2):
        flow = Flow([pj.plain(1), pj.plain_cached(1)])
        run_locally(flow, store=fresh_store(), log=False, ensure_success=True)
        assert [j.metadata for j in flow.jobs] == [{}, {}], "metadata untouched"
    assert counts() == Counter(plain=2, plain_cached=2)
    assert not isolated_cache.exists(), "no cache store opened"


def test_disable_in_the_settings_file_under_jobflow(counts, disabled_by_file, isolated_cache):
    for _ in range(2):
        j = pj.plain_cached(2)
        jobflow.run_locally(j, store=fresh_store(), log=False, ensure_success=True)
        assert j.metadata == {}
    assert counts() == Counter(plain_cached=2)
    assert not isolated_cache.exists()


def test_the_environment_wins_over_the_settings_file(
    counts, disabled_by_file, isolated_cache, monkeypatch
):
    monkeypatch.setenv("JOBFLOW_CACHE_DISABLE", "0")
    outcomes = []
    for _ in range(2):
        j = pj.plain_cached(3)
        jobflow.run_locally(j, store=fresh_store(), log=False, ensure_success=True)
        outcomes.append(outcome(j))
    assert outcomes == ["miss", "hit"]
    assert counts() == Counter(plain_cached=1)


# -- 5. relative cache paths -----------------------------------------------------------------------
def test_a_relative_cache_dir_is_resolved_where_the_run_starts(counts, tmp_path, monkeypatch):
    start = tmp_path / "start"
    start.mkdir()
    monkeypatch.chdir(start)
    monkeypatch.setenv("JOBFLOW_CACHE_DIR", "rel-cache")
    for n in range(2):  # a rebuilt flow finds the entries (and their files) of the first
        w = jobs.write_files("r", size=2)
        r = jobs.read_back(w.output)
        run_locally(Flow([w, r]), store=fresh_store(), create_folders=True, log=False)
        assert {outcome(w), outcome(r)} == ({"miss"} if n == 0 else {"hit"})
    assert counts() == Counter(write_files=1, read_back=1)
    assert (start / "rel-cache" / "cache.sqlite").is_file()
    assert not list(start.glob("job_*/rel-cache")), "no cache inside a job's run folder"


RUN_UNDER_JOBFLOW = """
import jobflow
from jobflow import JobStore
from maggma.stores import MemoryStore
from tests.support.provenance_jobs import write_here
j = write_here("x")
jobflow.run_locally(j, store=JobStore(MemoryStore()), log=False, create_folders=True,
                    ensure_success=True)
print(j.metadata["jobflow_cache"]["outcome"])
"""


def test_a_relative_cache_dir_under_jobflows_manager(counts, tmp_path):
    """@cached_job under jobflow.run_locally(create_folders=True), in fresh processes: the cache
    is opened inside the first job's run folder, and still lands where the process started."""
    start = tmp_path / "start"
    start.mkdir()
    env = {"JOBFLOW_CACHE_DIR": "rel-cache", "JOBFLOW_CACHE_OBJECTS_DIR": "rel-objects"}
    outcomes = [run_python(RUN_UNDER_JOBFLOW, env=env, cwd=start).split() for _ in range(2)]
    assert outcomes == [["miss"], ["hit"]]
    assert counts() == Counter(write_here=1)
    assert (start / "rel-cache" / "cache.sqlite").is_file()
    assert (start / "rel-objects").is_dir()
    assert not list(start.glob("job_*/rel-*"))
