"""@cached_job caches under jobflow's own manager, after serialisation, and for Makers."""

from __future__ import annotations

import json

import pytest
from jobflow import Flow, JobStore
from jobflow import run_locally as jobflow_run_locally
from maggma.stores import MemoryStore
from monty.json import MontyDecoder, MontyEncoder

from jobflow_cache import CacheStore, cached_job, run_locally
from jobflow_cache.execution.cache import META_KEY
from tests.support import jobs


def jf_run(flow, store=None):
    store = store or JobStore(MemoryStore())
    jobflow_run_locally(flow, store=store, log=False, ensure_success=True)
    return store


def test_cached_job_under_jobflows_own_manager(counts, run_dir, isolated_cache):
    s1 = jf_run(jobs.cached_add(1, 2))
    j = jobs.cached_add(1, 2)
    s2 = jf_run(j)
    assert counts()["cached_add"] == 1
    assert s2.get_output(j.uuid) == 3
    assert s2.query_one({"uuid": j.uuid})["metadata"][META_KEY]["outcome"] == "hit"
    assert (isolated_cache / "cache.sqlite").exists(), "the embedded default store was used"
    assert s1.count() == 1


def test_cached_job_survives_a_serialisation_round_trip(counts, run_dir):
    def flow():
        a = jobs.cached_add(2, 3)
        return Flow([a, jobs.CachedMaker(factor=4).make(a.output)])

    jf_run(flow())
    text = json.dumps(flow().as_dict(), cls=MontyEncoder)
    revived = MontyDecoder().process_decoded(json.loads(text))
    store = jf_run(revived)
    assert counts() == {"cached_add": 1, "cached maker": 1}
    assert store.get_output(revived[1].uuid) == 20


def test_maker_fields_and_cache_version_and_ignore(counts, run_dir):
    jf_run(jobs.CachedMaker(factor=3).make(2))
    jf_run(jobs.CachedMaker(factor=3).make(2))
    jf_run(jobs.CachedMaker(factor=5).make(2))
    assert counts()["cached maker"] == 2

    jf_run(jobs.cached_scale(4))
    jf_run(jobs.cached_scale(4, verbose=True))  # ignored argument
    jf_run(jobs.cached_scale(4, factor=2))  # default given explicitly
    assert counts()["cached_scale"] == 1


def test_cache_version_changes_the_digest():
    def f(x):
        return x

    f.__module__, f.__qualname__ = "tests.support.jobs", "versioned"
    v1 = cached_job(cache_version=1)(f)
    v2 = cached_job(cache_version=2)(f)
    assert v1.cache_digest(1).digest != v2.cache_digest(1).digest
    assert v1.cache_digest(1).digest == cached_job(cache_version="1")(f).cache_digest(1).digest


def test_cache_digest_matches_what_the_run_records(run_dir):
    j = jobs.cached_add(5, b=6)
    store = jf_run(j)
    recorded = store.query_one({"uuid": j.uuid})["metadata"][META_KEY]["digest"]
    assert jobs.cached_add.cache_digest(5, 6).digest == recorded
    maker = jobs.CachedMaker(factor=7)
    mj = maker.make(2)
    store = jf_run(mj)
    recorded = store.query_one({"uuid": mj.uuid})["metadata"][META_KEY]["digest"]
    assert jobs.CachedMaker.make.cache_digest(maker, 2).digest == recorded


def test_original_outside_a_job_is_the_plain_function(counts):
    assert jobs.cached_add.original(2, 2) == 4
    assert counts()["cached_add"] == 1


def test_decorated_jobs_use_the_run_locally_cache(
    counts, run_dir, tmp_path, cache_store, isolated_cache
):
    run_locally(jobs.cached_add(8, 8), cache=cache_store, log=False)
    cache_store.connect()
    assert cache_store.count() == 1
    assert not (isolated_cache / "cache.sqlite").exists()


def test_bad_ignore_name_is_rejected():
    def g(x):
        return x

    g.__module__, g.__qualname__ = "tests.support.jobs", "g"
    with pytest.raises(ValueError, match="unknown arguments"):
        cached_job(ignore=["nope"])(g)


def test_job_kwargs_are_passed_to_jobflow(run_dir):
    def h(x):
        return {"big": [x] * 3}

    h.__module__, h.__qualname__ = "tests.support.jobs", "h"
    decorated = cached_job(data="big", name="custom")(h)
    j = decorated(1)
    assert j.name == "custom"
    assert j._kwargs == {"data": "big"}


def test_cached_store_spec_through_settings(counts, run_dir, tmp_path, monkeypatch):
    """JOBFLOW_CACHE_STORE takes a maggma spec like jobflow's JOB_STORE."""
    spec = {"type": "JSONStore", "paths": str(tmp_path / "spec.json"), "read_only": False}
    monkeypatch.setenv("JOBFLOW_CACHE_STORE", json.dumps(spec))
    jf_run(jobs.cached_add(3, 3))
    jf_run(jobs.cached_add(3, 3))
    assert counts()["cached_add"] == 1
    with CacheStore.from_settings() as store:
        assert store.count() == 1
        assert store.store.paths == [str(tmp_path / "spec.json")]


def test_disabled_decorated_job_touches_nothing(counts, run_dir, isolated_cache, monkeypatch):
    monkeypatch.setenv("JOBFLOW_CACHE_DISABLE", "1")
    j = jobs.cached_add(1, 1)
    store = jf_run(j)
    jf_run(jobs.cached_add(1, 1))
    assert counts()["cached_add"] == 2
    assert not isolated_cache.exists(), "no store or object area is created"
    assert META_KEY not in store.query_one({"uuid": j.uuid})["metadata"]
