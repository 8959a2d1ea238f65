"""The cold path (a job that misses, runs and is recorded): its shortcuts give what the plain
computations give."""

from __future__ import annotations

import gc
import weakref

from jobflow import Flow

from jobflow_cache import run_locally
from tests.support import jobs


def test_entries_name_the_maker_and_keep_no_recorded_job_alive(
    job_store, cache_store, run_dir
) -> None:
    """``maker`` is the class of the Maker a job was made by (None for a function), and
    recording a job keeps no reference to it once the flow is gone (the maker used to be
    memoised per Job, holding every recorded job for the life of the process)."""
    relax = jobs.RelaxMaker(name="r1").make(1.0)
    other = jobs.RelaxMaker(name="r2", steps=3).make(relax.output["value"])
    plain = jobs.add(other.output["value"], 1)
    flow = Flow([relax, other, plain])
    run_locally(flow, store=job_store, cache=cache_store, log=False)
    cache_store.connect()
    makers = {entry.name: entry.maker for entry in cache_store.entries()}
    assert makers == {
        "r1": "tests.support.jobs:RelaxMaker",
        "r2": "tests.support.jobs:RelaxMaker",
        "add": None,
    }
    held = [weakref.ref(j) for j in (relax, other, plain)]
    del flow, relax, other, plain
    gc.collect()
    assert [ref() for ref in held] == [None, None, None]
