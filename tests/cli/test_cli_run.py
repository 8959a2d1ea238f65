"""What a run tells its user (issue 12): the summary, warnings at the user's line, tracebacks
with the frames plain jobflow shows, and bad settings that never fail a workflow."""

from __future__ import annotations

import logging
import re
import traceback

import jobflow
import pytest
from jobflow import Flow, JobStore
from maggma.stores import MemoryStore

from jobflow_cache import CacheSettings, CacheWarning, run_locally
from jobflow_cache.errors import SettingsError
from tests.support import jobs


@pytest.fixture
def summary(caplog):
    """The run summary lines logged on ``jobflow.cache``."""
    caplog.set_level(logging.INFO, logger="jobflow.cache")

    def lines() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "jobflow.cache" and not r.getMessage().startswith("Served")
        ]

    return lines


def store() -> JobStore:
    return JobStore(MemoryStore())


def failing_flow() -> Flow:
    failed = jobs.fail_job(1)
    return Flow([failed, jobs.add(failed.output, 1), jobs.add(1, 2)])


def test_summary_counts_failed_and_not_run_jobs(summary, counts):
    run_locally(failing_flow(), store=store())
    assert summary() == [
        "Cache summary - 3 jobs: 0 served from cache, 2 executed (1 failed), 1 not run; "
        "0.0 s of compute saved"
    ]
    assert counts() == {"fail_job": 1, "add": 1}
    run_locally(failing_flow(), store=store(), log=False)
    assert len(summary()) == 1, "log=False: no summary"


def test_summary_with_the_cache_disabled_counts_the_jobs(summary, counts, monkeypatch):
    monkeypatch.setenv("JOBFLOW_CACHE_DISABLE", "1")
    first = jobs.add(1, 2)
    flow = Flow([first, *(jobs.add(first.output, i) for i in range(4))])
    run_locally(flow, store=store())
    assert summary() == [
        "Cache summary - 5 jobs: 0 served from cache, 5 executed; "
        "cache off: JOBFLOW_CACHE_DISABLE is set"
    ]
    assert counts()["add"] == 5


@pytest.mark.warnings_logged
def test_summary_says_the_cache_was_off_with_an_unusable_store(summary, counts, monkeypatch):
    monkeypatch.setenv("JOBFLOW_CACHE_STORE", '{"type": "NoSuchStore"}')
    run_locally(Flow([jobs.add(1, 2), jobs.add(3, 4)]), store=store())
    (line,) = summary()
    assert line.startswith(
        "Cache summary - 2 jobs: 0 served from cache, 2 executed; cache off: store configured "
        "by JOBFLOW_CACHE_STORE cannot be built"
    )
    assert counts()["add"] == 2


def test_summary_explains_a_near_miss_with_the_differing_field(summary, counts):
    run_locally(jobs.RelaxMaker(name="relax", steps=50).make(1.0), store=store())
    relax = jobs.RelaxMaker(name="relax", steps=60).make(1.0)
    flow = Flow([relax, jobs.add(2, 3)])
    run_locally(Flow([jobs.add(2, 3)]), store=store(), log=False)  # cached before
    job_store = store()
    run_locally(flow, store=job_store)
    digest = job_store.query_one({"uuid": relax.uuid})["metadata"]["jobflow_cache"]["digest"]
    assert summary()[-2:] == [
        "Cache summary - 2 jobs: 1 served from cache, 1 executed; 0.0 s of compute saved",
        f"  relax: self.steps 50 \u2192 60; cachetool explain {digest[:8]}",
    ]


def test_summary_names_uncached_jobs_and_the_reason(summary, counts):
    with pytest.warns(CacheWarning) as record:
        run_locally(Flow([jobs.open_handle_job(lambda x: x), jobs.add(1, 1)]), store=store())
    assert summary()[-1].endswith("; 1 ran uncached (input cannot be hashed)")
    assert cache_warnings(record) == [__file__], "it points at the user's run_locally call"


def cache_warnings(record) -> list[str]:
    """The files CacheWarnings point at (jobflow's own FutureWarnings left out)."""
    return [w.filename for w in record if issubclass(w.category, CacheWarning)]


def test_warnings_of_a_cached_job_under_jobflow_point_at_the_user(counts, monkeypatch):
    monkeypatch.setenv("JOBFLOW_CACHE_STORE", '{"type": "NoSuchStore"}')
    with pytest.warns(CacheWarning) as record:
        jobflow.run_locally(jobs.cached_add(1, 2), store=store(), log=False)
    assert cache_warnings(record) == [__file__]


def frames(err: BaseException) -> list[str]:
    return [frame.name for frame in traceback.extract_tb(err.__traceback__)]


def test_a_failed_job_has_the_frames_of_plain_jobflow(counts, caplog):
    with pytest.raises(ValueError, match="always fails") as plain:
        jobflow.run_locally(jobs.fail_job(1), store=store(), log=False, raise_immediately=True)
    with pytest.raises(ValueError, match="always fails") as ours:
        run_locally(jobs.fail_job(1), store=store(), log=False, raise_immediately=True)
    assert len(frames(ours.value)) <= len(frames(plain.value)), (
        frames(ours.value),
        frames(plain.value),
    )
    assert frames(ours.value)[-2:] == ["run", "fail_job"], "Job.run, then the job"
    assert not any(name in {"call", "_call", "_run_and_record"} for name in frames(ours.value))

    caplog.set_level(logging.INFO, logger="jobflow.managers.local")

    def logged(run) -> list[str]:
        caplog.clear()
        run(jobs.fail_job(1), store=store(), log=False)
        (text,) = [r.getMessage() for r in caplog.records if "failed with exception" in r.msg]
        return re.findall(r'File "[^"]+", line \d+, in (\w+)', text)

    assert logged(run_locally) == ["_run_job", "run", "fail_job"]
    assert len(logged(run_locally)) <= len(logged(jobflow.run_locally))


def test_a_bad_setting_in_python_is_one_line():
    with pytest.raises(SettingsError) as err:
        CacheSettings(FILES="hardlink")
    assert str(err.value) == (
        "bad jobflow-cache setting FILES='hardlink': allowed values: 'link', 'copy' or 'none'"
    )
    assert err.value.__cause__ is None
    assert err.value.__suppress_context__, "no 15-line pydantic traceback chained to it"


@pytest.mark.parametrize("runner", ["run_locally", "cached_job"])
def test_a_bad_setting_never_fails_a_workflow(runner, counts, monkeypatch):
    monkeypatch.setenv("JOBFLOW_CACHE_FILES", "hardlink")
    job = jobs.add(1, 2) if runner == "run_locally" else jobs.cached_add(1, 2)
    run = run_locally if runner == "run_locally" else jobflow.run_locally
    job_store = store()
    with pytest.warns(CacheWarning, match="JOBFLOW_CACHE_FILES='hardlink'") as record:
        run(Flow([job, jobs.add(job.output, 1)]), store=job_store, log=False)
    assert len(cache_warnings(record)) == 1, [str(w.message) for w in record]
    assert job_store.get_output(job.uuid) == 3
    assert counts()["add"] + counts()["cached_add"] == 2


def test_progress_on_a_terminal_only(tmp_path):
    """log=False: a live count on stderr when it is a terminal, nothing otherwise."""
    import os
    import pty
    import subprocess
    import sys

    from tests.conftest import pythonpath

    code = (
        "from jobflow import Flow\nfrom jobflow_cache import run_locally\nfrom tests.support "
        "import jobs\n"
        "first = jobs.add(1, 2)\n"
        "run_locally(Flow([first, *(jobs.add(first.output, i) for i in range(20))]), log=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": pythonpath()}
    plain = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert (plain.returncode, plain.stdout, plain.stderr) == (0, "", "")
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, stderr=follower, stdout=follower
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    assert b"jobs done" in shown, shown
