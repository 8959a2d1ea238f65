"""The interception core through real flows, real JobStores and a real SQLite cache store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from jobflow import Flow, JobStore, job
from jobflow import run_locally as jobflow_run_locally
from maggma.stores import MemoryStore

from jobflow_cache import (
    Cache,
    CacheStore,
    CacheWarning,
    Outcome,
    run_locally,
)
from jobflow_cache.backends import SQLiteBackend
from jobflow_cache.execution.cache import LARGE_FOLDER, META_KEY
from tests.support import jobs


def outputs(store: JobStore, flow: Flow) -> list:
    """Outputs of a flow's jobs in flow order (highest index of each uuid)."""
    return [store.get_output(j.uuid, which="last", load=True) for j in flow]


def meta(store: JobStore, uuid: str, index: int = 1) -> dict:
    return store.query_one({"uuid": uuid, "index": index})["metadata"][META_KEY]


def run_in(root, flow, job_store, cache_store, **kwargs):
    """run_locally with one folder per job under ``root``."""
    return run_locally(
        flow,
        store=job_store,
        cache=cache_store,
        log=False,
        create_folders=True,
        root_dir=root,
        **kwargs,
    )


def chain() -> Flow:
    a = jobs.add(1, 2)
    b = jobs.mul(a.output, 10)
    c = jobs.add(b.output, a.output)
    return Flow([a, b, c])


def test_fresh_flow_instance_is_served_from_cache(counts, job_store, cache_store, run_dir):
    first = chain()
    run_locally(first, store=job_store, cache=cache_store, log=False, ensure_success=True)
    assert counts() == {"add": 2, "mul": 1}
    cold = outputs(job_store, first)

    second = chain()  # all-new uuids
    assert {j.uuid for j in second}.isdisjoint({j.uuid for j in first})
    run_locally(second, store=job_store, cache=cache_store, log=False, ensure_success=True)
    assert counts() == {"add": 2, "mul": 1}, "nothing may execute on the second run"
    assert outputs(job_store, second) == cold == [3, 30, 33]
    for j_old, j_new in zip(first, second):
        assert meta(job_store, j_new.uuid)["outcome"] == "hit"
        assert meta(job_store, j_new.uuid)["digest"] == meta(job_store, j_old.uuid)["digest"]
        assert meta(job_store, j_new.uuid)["source_uuid"] == j_old.uuid
    assert meta(job_store, first[0].uuid)["outcome"] == "miss"


def test_different_inputs_miss(counts, job_store, cache_store, run_dir):
    run_locally(jobs.add(1, 2), store=job_store, cache=cache_store, log=False)
    run_locally(jobs.add(1, 3), store=job_store, cache=cache_store, log=False)
    run_locally(jobs.add(1.0, 2), store=job_store, cache=cache_store, log=False)  # 1.0 is not 1
    assert counts()["add"] == 3
    # keyword, positional and default forms of one call are the same call
    run_locally(jobs.add(a=1, b=2), store=job_store, cache=cache_store, log=False)
    run_locally(jobs.add(3), store=job_store, cache=cache_store, log=False)
    run_locally(jobs.add(3, b=0), store=job_store, cache=cache_store, log=False)
    assert counts()["add"] == 4


def test_identical_jobs_in_one_flow_run_once(counts, job_store, cache_store, run_dir):
    a, b = jobs.add(5, 5), jobs.add(5, 5)
    flow = Flow([a, b])
    run_locally(flow, store=job_store, cache=cache_store, log=False, ensure_success=True)
    assert counts()["add"] == 1
    assert outputs(job_store, flow) == [10, 10]
    assert meta(job_store, b.uuid)["outcome"] == "hit"


def test_maker_fields_enter_the_digest(counts, job_store, cache_store, run_dir):
    run_locally(jobs.RelaxMaker(steps=10).make(1), store=job_store, cache=cache_store, log=False)
    run_locally(jobs.RelaxMaker(steps=10).make(1), store=job_store, cache=cache_store, log=False)
    assert counts()["relax"] == 1
    run_locally(jobs.RelaxMaker(steps=11).make(1), store=job_store, cache=cache_store, log=False)
    run_locally(
        jobs.RelaxMaker(settings={"ENCUT": 520}).make(1),
        store=job_store,
        cache=cache_store,
        log=False,
    )
    assert counts()["relax"] == 3


def test_failed_job_is_not_recorded(counts, job_store, cache_store, run_dir, monkeypatch):
    monkeypatch.setenv("JFC_FAIL", "relax")
    run_locally(jobs.RelaxMaker().make(1), store=job_store, cache=cache_store, log=False)
    cache_store.connect()
    assert cache_store.count() == 0
    monkeypatch.delenv("JFC_FAIL")
    run_locally(jobs.RelaxMaker().make(1), store=job_store, cache=cache_store, log=False)
    assert counts()["relax"] == 2
    cache_store.connect()
    assert cache_store.count() == 1


def test_files_are_copied_into_the_new_run_folder(counts, job_store, cache_store, tmp_path):
    root1, root2 = tmp_path / "run1", tmp_path / "run2"
    w1 = jobs.write_files("x", size=3)
    r1 = jobs.read_back(w1.output)
    run_in(root1, Flow([w1, r1]), job_store, cache_store, ensure_success=True)
    w2 = jobs.write_files("x", size=3)
    r2 = jobs.read_back(w2.output)
    responses = run_in(root2, Flow([w2, r2]), job_store, cache_store, ensure_success=True)
    assert counts() == {"write_files": 1, "read_back": 1}, "both jobs must be served"

    out = job_store.get_output(w2.uuid)
    new_dir = Path(out["dir_name"])
    assert new_dir.parent == root2, "paths into the old run folder are rewritten"
    assert out["file"] == str(new_dir / "result.txt")
    assert responses[w2.uuid][1].job_dir == new_dir
    old_dir = Path(job_store.get_output(w1.uuid)["dir_name"])
    for rel in ("result.txt", "sub/data.bin"):
        old, new = old_dir / rel, new_dir / rel
        assert new.read_bytes() == old.read_bytes()
        # independent copies (issue 11): no inode shared with the object area or another run
        assert new.stat().st_ino != old.stat().st_ino
        assert new.stat().st_nlink == 1
        assert old.stat().st_nlink == 1, "recording never hard-links the user's file"
        assert new.stat().st_mode & 0o200, "a served file is writable, as the job left it"
    assert job_store.get_output(r2.uuid) == 3


def test_copy_mode_gives_independent_files(counts, job_store, cache_store, tmp_path):
    run_in(tmp_path / "a", jobs.write_files("y"), job_store, cache_store)
    w = jobs.write_files("y")
    run_in(tmp_path / "b", w, job_store, cache_store, files="copy")
    assert counts()["write_files"] == 1
    new = Path(job_store.get_output(w.uuid)["dir_name"]) / "result.txt"
    assert new.stat().st_nlink == 1
    assert new.stat().st_mode & 0o200
    assert new.read_text() == "y\n" * 10


def test_upstream_uuid_in_inputs_is_normalised(counts, job_store, cache_store, run_dir):
    def flow():
        src = jobs.my_uuid()
        use = jobs.uuid_consumer(src.output["uuid"], 5)
        return Flow([src, use])

    f1 = flow()
    run_locally(f1, store=job_store, cache=cache_store, log=False, ensure_success=True)
    f2 = flow()
    run_locally(f2, store=job_store, cache=cache_store, log=False, ensure_success=True)
    assert counts() == {"my_uuid": 1, "uuid_consumer": 1}
    # the served outputs name the new jobs, not the ones of the first run
    assert job_store.get_output(f2[0].uuid)["uuid"] == f2[0].uuid
    assert job_store.get_output(f2[1].uuid)["from"] == f2[0].uuid


def test_unhashable_input_warns_and_runs_uncached(counts, job_store, cache_store, run_dir):
    # jobflow itself refuses non-serializable arguments (open files, locks) when a job is made;
    # a lambda passes jobflow but has no canonical form
    j = jobs.open_handle_job(lambda x: x)
    with pytest.warns(CacheWarning, match=r"open_handle_job.*handle"):
        run_locally(j, store=job_store, cache=cache_store, log=False, ensure_success=True)
    with pytest.warns(CacheWarning, match="cannot be hashed"):
        run_locally(
            jobs.open_handle_job(lambda x: x),
            store=job_store,
            cache=cache_store,
            log=False,
            ensure_success=True,
        )
    assert counts()["open_handle_job"] == 2
    assert job_store.get_output(j.uuid) == 1
    assert meta(job_store, j.uuid)["outcome"] == Outcome.UNCACHEABLE.value
    cache_store.connect()
    assert cache_store.count() == 0


def test_corrupt_entry_is_never_served(counts, job_store, cache_store, run_dir):
    run_locally(jobs.add(2, 2), store=job_store, cache=cache_store, log=False)
    cache_store.connect()
    doc = next(cache_store.find())
    doc["output"] = "5"  # tampered output: the checksum no longer matches
    cache_store.backend.write([doc])
    j = jobs.add(2, 2)
    with pytest.warns(CacheWarning, match="checksum"):
        run_locally(j, store=job_store, cache=cache_store, log=False)
    assert job_store.get_output(j.uuid) == 4
    assert counts()["add"] == 2
    # the bad entry was replaced by a sound one
    run_locally(jobs.add(2, 2), store=job_store, cache=cache_store, log=False)
    assert counts()["add"] == 2


def test_entry_with_garbage_document_is_not_served(counts, job_store, cache_store, run_dir):
    run_locally(jobs.add(2, 3), store=job_store, cache=cache_store, log=False)
    cache_store.connect()
    digest = next(cache_store.find())["digest"]
    cache_store.backend.write([{"digest": digest, "output": {"not": "an entry"}}])
    j = jobs.add(2, 3)
    with pytest.warns(CacheWarning, match="does not decode"):
        run_locally(j, store=job_store, cache=cache_store, log=False)
    assert job_store.get_output(j.uuid) == 5


def test_missing_file_objects_rerun_the_job(counts, job_store, cache_store, tmp_path):
    run_in(tmp_path / "a", jobs.write_files("z"), job_store, cache_store)
    for obj in Path(cache_store.objects_dir).rglob("*"):
        if obj.is_file():
            obj.chmod(0o644)
            obj.unlink()
    w = jobs.write_files("z")
    with pytest.warns(CacheWarning, match="missing"):
        run_in(tmp_path / "b", w, job_store, cache_store)
    assert counts()["write_files"] == 2
    assert (Path(job_store.get_output(w.uuid)["dir_name"]) / "result.txt").read_text() == "z\n" * 10


def test_unreachable_store_runs_everything_uncached(counts, job_store, tmp_path, run_dir):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    broken = CacheStore(SQLiteBackend(blocker / "cache.sqlite"), tmp_path / "o")
    flow = chain()
    with pytest.warns(CacheWarning, match="unavailable") as record:
        run_locally(flow, store=job_store, cache=broken, log=False, ensure_success=True)
    assert len([w for w in record if issubclass(w.category, CacheWarning)]) == 1, "warn once"
    assert outputs(job_store, flow) == [3, 30, 33]
    assert counts() == {"add": 2, "mul": 1}


def test_disable_env_is_plain_jobflow(counts, tmp_path, monkeypatch, run_dir, isolated_cache):
    monkeypatch.setenv("JOBFLOW_CACHE_DISABLE", "1")
    ours_store = JobStore(MemoryStore())
    flow = chain()
    run_locally(flow, store=ours_store, log=False)
    run_locally(chain(), store=ours_store, log=False)
    assert counts() == {"add": 4, "mul": 2}
    assert not isolated_cache.exists(), "nothing is created or written"
    doc = ours_store.query_one({"uuid": flow[0].uuid})
    assert META_KEY not in doc["metadata"]

    plain_store = JobStore(MemoryStore())
    ref = chain()
    jobflow_run_locally(ref, store=plain_store, log=False)
    assert outputs(ours_store, flow) == outputs(plain_store, ref)


def test_per_job_opt_out_through_metadata(counts, job_store, cache_store, run_dir):
    def flow():
        f = chain()
        f.update_metadata({META_KEY: {"enabled": False}}, function_filter=jobs.mul)
        return f

    run_locally(flow(), store=job_store, cache=cache_store, log=False)
    f2 = flow()
    run_locally(f2, store=job_store, cache=cache_store, log=False)
    assert counts() == {"add": 2, "mul": 2}
    assert meta(job_store, f2[1].uuid)["outcome"] == "disabled"
    assert meta(job_store, f2[0].uuid)["outcome"] == "hit"


def test_cache_version_in_metadata_separates_entries(counts, job_store, cache_store, run_dir):
    j1 = jobs.add(1, 1)
    run_locally(j1, store=job_store, cache=cache_store, log=False)
    j2 = jobs.add(1, 1)
    j2.update_metadata({META_KEY: {"cache_version": "2"}})
    run_locally(j2, store=job_store, cache=cache_store, log=False)
    assert counts()["add"] == 2
    assert meta(job_store, j1.uuid)["digest"] != meta(job_store, j2.uuid)["digest"]


def test_cache_session_report_counts_outcomes(counts, job_store, cache_store, run_dir):
    run_locally(chain(), store=job_store, cache=cache_store, log=False)
    session = Cache(cache_store)
    run_locally(chain(), store=job_store, cache=session, log=False)
    assert session.report.hits == 3
    assert len(session.report.executed) == 0
    assert "3 served from cache" in session.report.summary()


def test_run_locally_restores_job_run(job_store, cache_store, run_dir):
    from jobflow import Job

    before = Job.run
    with pytest.raises(RuntimeError):
        run_locally(
            jobs.fail_job(1), store=job_store, cache=cache_store, log=False, ensure_success=True
        )
    assert Job.run is before


def test_cache_warnings_do_not_escape_as_errors_on_success(job_store, cache_store, run_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        run_locally(chain(), store=job_store, cache=cache_store, log=False)
        run_locally(chain(), store=job_store, cache=cache_store, log=False)
    assert os.path.exists(cache_store.backend.owned_paths()[0])


def test_cache_inside_the_run_folder_is_never_recorded(counts, job_store, run_dir, monkeypatch):
    """The embedded store and object area under the run folder are not files of the job."""
    monkeypatch.setenv("JOBFLOW_CACHE_DIR", str(run_dir / "cache"))
    run_locally(jobs.write_files("q"), store=job_store, log=False)
    session = Cache()
    w = jobs.write_files("q")
    run_locally(w, store=job_store, cache=session, log=False)
    assert counts()["write_files"] == 1
    with session.store as store:
        (entry,) = list(store.entries())
    assert sorted(f.path for f in entry.files) == ["result.txt", "sub/data.bin"]
    assert meta(job_store, w.uuid)["outcome"] == "hit"


def test_upstream_uuid_and_folder_are_rewritten_apart(counts, job_store, cache_store, tmp_path):
    """A job's uuid and folder share its digest; served outputs must keep them apart."""

    def flow():
        p = jobs.producer()
        return Flow([p, jobs.consumer(p.output)])

    run_in(tmp_path / "r1", flow(), job_store, cache_store)
    f = flow()
    run_in(tmp_path / "r2", f, job_store, cache_store)
    assert counts() == {"producer": 1, "consumer": 1}
    served = job_store.get_output(f[1].uuid)
    assert served["uuid"] == f[0].uuid
    assert Path(served["dir"]).parent == tmp_path / "r2"
    assert served == job_store.get_output(f[0].uuid)


def test_concurrent_runs_in_threads_use_their_own_caches(counts, tmp_path):
    """run_locally in two threads at once (and plain jobflow in a third) do not mix."""
    import threading

    from jobflow import Job

    caches = [
        CacheStore(SQLiteBackend(tmp_path / f"c{i}.sqlite"), tmp_path / "o") for i in range(2)
    ]
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def ours(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(5):
                run_locally(
                    chain(),
                    store=JobStore(MemoryStore()),
                    cache=caches[i],
                    log=False,
                    ensure_success=True,
                )
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    def plain() -> None:
        try:
            barrier.wait()
            for _ in range(5):
                store = JobStore(MemoryStore())
                f = chain()
                jobflow_run_locally(f, store=store, log=False, ensure_success=True)
                assert all(META_KEY not in d["metadata"] for d in store.query({}))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    before = Job.run
    threads = [threading.Thread(target=ours, args=(i,)) for i in range(2)]
    threads.append(threading.Thread(target=plain))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Job.run is before
    for cache in caches:
        cache.connect()
        assert cache.count() == 3, "each thread's entries land in its own cache"
    # 2 cached threads x 3 jobs once each, plus the plain thread's 5 x 3 executions
    assert counts() == {"add": 2 * 2 + 5 * 2, "mul": 2 + 5}


def test_a_failure_inside_hashing_runs_the_job_uncached(
    counts, job_store, cache_store, run_dir, monkeypatch
):
    # jobflow serializes every argument itself before a job runs, so an input whose as_dict()
    # fails never reaches us; what can happen is an unforeseen error in our own hasher, which
    # is injected here
    from jobflow_cache.execution import digest

    def broken(*args, **kwargs):
        raise RuntimeError("hasher bug")

    monkeypatch.setattr(digest, "digest_call", broken)
    j = jobs.takes_anything(None, n=5)
    with pytest.warns(CacheWarning, match=r"takes_anything.*hashing its input failed.*hasher bug"):
        run_locally(j, store=job_store, cache=cache_store, log=False, ensure_success=True)
    assert job_store.get_output(j.uuid) == 5
    assert counts()["takes_anything"] == 1
    assert meta(job_store, j.uuid)["outcome"] == "uncacheable"


def test_wrong_arguments_fail_exactly_like_jobflow(job_store, cache_store, run_dir):
    from jobflow import Job

    def bad():
        return Job(jobs.takes_anything, function_args=(1, 2, 3))

    with pytest.raises(TypeError) as ours:
        run_locally(bad(), store=job_store, cache=cache_store, log=False, raise_immediately=True)
    with pytest.raises(TypeError) as theirs:
        jobflow_run_locally(bad(), store=JobStore(MemoryStore()), log=False, raise_immediately=True)
    assert str(ours.value) == str(theirs.value)


def test_unlistable_run_folder_runs_the_job_and_records_nothing(
    counts, job_store, cache_store, run_dir, monkeypatch
):
    # a folder that cannot be listed cannot be made as root (permission bits are ignored),
    # so the listing failure is simulated by replacing the snapshot function
    from jobflow_cache.execution import recording

    def unlistable(folder, exclude=()):
        raise PermissionError(f"cannot list {folder}")

    monkeypatch.setattr(recording, "snapshot", unlistable)
    w = jobs.write_files("u")
    with pytest.warns(CacheWarning, match="could not be listed"):
        run_locally(w, store=job_store, cache=cache_store, log=False, ensure_success=True)
    assert job_store.get_output(w.uuid)["tag"] == "u"
    cache_store.connect()
    assert cache_store.count() == 0, "an entry without its files would be served incomplete"


def test_any_failure_while_serving_runs_the_job(
    counts, job_store, cache_store, run_dir, monkeypatch
):
    from jobflow_cache.execution import serving

    run_locally(jobs.add(6, 6), store=job_store, cache=cache_store, log=False)

    def broken_loads(text):
        raise RecursionError("unexpected")

    monkeypatch.setattr(serving, "loads", broken_loads)  # an unforeseen decoder failure
    j = jobs.add(6, 6)
    with pytest.warns(CacheWarning, match="cannot be served"):
        run_locally(j, store=job_store, cache=cache_store, log=False, ensure_success=True)
    assert job_store.get_output(j.uuid) == 12
    assert counts()["add"] == 2


def test_deleted_original_run_folder_still_serves_its_files(
    counts, job_store, cache_store, tmp_path
):
    """Files live in the object area: removing the first run's folders loses nothing."""
    import shutil

    run_in(tmp_path / "first", jobs.write_files("d"), job_store, cache_store)
    shutil.rmtree(tmp_path / "first")
    w = jobs.write_files("d")
    run_in(tmp_path / "second", w, job_store, cache_store)
    assert counts()["write_files"] == 1
    folder = Path(job_store.get_output(w.uuid)["dir_name"])
    assert (folder / "result.txt").read_text() == "d\n" * 10
    assert (folder / "sub" / "data.bin").read_bytes() == b"d" * 10


def test_files_none_records_no_files_but_restores_an_entrys_files(
    counts, job_store, cache_store, tmp_path
):
    """FILES=none means "record no files". An entry recorded with files elsewhere gets them back
    when served (its output may name them): a folder without them would not match the output."""
    run_in(tmp_path / "a", jobs.write_files("n"), job_store, cache_store)
    w = jobs.write_files("n")
    w.update_metadata({META_KEY: {"files": "none"}})
    run_in(tmp_path / "b", w, job_store, cache_store)
    assert counts()["write_files"] == 1
    assert meta(job_store, w.uuid)["outcome"] == "hit"
    folder = next((tmp_path / "b").iterdir())
    assert (folder / "result.txt").read_text() == "n\n" * 10
    # recorded with files=none: the entry lists the files by digest only (issue 11); a hit
    # copies them from the recording folder while they are unchanged there, else runs
    x = jobs.write_files("m")
    x.update_metadata({META_KEY: {"files": "none"}})
    run_in(tmp_path / "c", x, job_store, cache_store)
    y = jobs.write_files("m")
    run_in(tmp_path / "d", y, job_store, cache_store)
    assert counts()["write_files"] == 2
    assert meta(job_store, y.uuid)["outcome"] == "hit"
    served = next((tmp_path / "d").iterdir())
    assert (served / "result.txt").read_text() == "m\n" * 10
    assert (served / "sub" / "data.bin").read_bytes() == b"m" * 10
    (next((tmp_path / "c").iterdir()) / "result.txt").write_text("edited")
    z = jobs.write_files("m")
    run_in(tmp_path / "e", z, job_store, cache_store)
    assert counts()["write_files"] == 3, "the source changed: the job runs"
    assert meta(job_store, z.uuid)["outcome"] == "miss"
    assert "result.txt" in meta(job_store, z.uuid)["reason"]


def test_partial_files_of_a_failed_job_are_never_recorded(
    counts, job_store, cache_store, tmp_path, monkeypatch
):
    monkeypatch.setenv("JFC_FAIL", "write_then_fail")
    run_in(tmp_path / "a", jobs.write_then_fail("p"), job_store, cache_store)
    assert len(list((tmp_path / "a").glob("*/partial.txt"))) == 1, "the job did write"
    cache_store.connect()
    assert cache_store.count() == 0
    objects = Path(cache_store.objects_dir)
    assert not objects.exists() or not [p for p in objects.rglob("*") if p.is_file()]
    monkeypatch.delenv("JFC_FAIL")
    j = jobs.write_then_fail("p")
    run_in(tmp_path / "b", j, job_store, cache_store)
    assert meta(job_store, j.uuid)["outcome"] == "miss", "nothing was served from the failure"


def test_files_over_max_file_size_are_skipped_and_listed(
    counts, job_store, cache_store, tmp_path, monkeypatch
):
    # result.txt holds 50 bytes, sub/data.bin 40: a 45-byte limit keeps only the latter
    monkeypatch.setenv("JOBFLOW_CACHE_MAX_FILE_SIZE", "45")
    w1 = jobs.write_files("abcd", size=10)
    run_in(tmp_path / "run1", w1, job_store, cache_store, ensure_success=True)
    (entry,) = cache_store.entries()
    assert [(f.path, f.stored) for f in entry.files] == [
        ("result.txt", False),
        ("sub/data.bin", True),
    ]
    assert entry.files_skipped == {"result.txt": 50}
    w2 = jobs.write_files("abcd", size=10)
    run_in(tmp_path / "run2", w2, job_store, cache_store, ensure_success=True)
    assert counts() == {"write_files": 1}
    new_dir = Path(job_store.get_output(w2.uuid)["dir_name"])
    assert (new_dir / "sub/data.bin").read_bytes() == b"abcd" * 10
    # a skipped file is copied from the recording folder, where it is unchanged (issue 11)
    assert (new_dir / "result.txt").read_text() == "abcd\n" * 10
    old_dir = Path(job_store.get_output(w1.uuid)["dir_name"])
    (old_dir / "result.txt").write_text("gone")
    w3 = jobs.write_files("abcd", size=10)
    run_in(tmp_path / "run3", w3, job_store, cache_store, ensure_success=True)
    assert counts() == {"write_files": 2}, "no longer there unchanged: the job runs"


# -- entries and hit counts written behind, in batches, during a run -------------------------------
def on_disk(cache_store: CacheStore) -> CacheStore:
    """A second connection to the same SQLite file: sees only what was committed."""
    return CacheStore(SQLiteBackend(cache_store.backend.owned_paths()[0]), cache_store.objects_dir)


def fan(n: int, offset: int = 0) -> Flow:
    return Flow([jobs.add(i + offset, 1) for i in range(n)])


def test_entries_and_hits_are_on_disk_when_run_locally_returns(
    counts, job_store, cache_store, run_dir
):
    run_locally(fan(40), store=job_store, cache=cache_store, log=False, ensure_success=True)
    with on_disk(cache_store) as other:
        assert other.count() == 40
        assert all(e.hits == 0 for e in other.entries())
    warm = fan(40)
    run_locally(warm, store=job_store, cache=cache_store, log=False, ensure_success=True)
    assert counts() == {"add": 40}
    assert {meta(job_store, j.uuid)["outcome"] for j in warm} == {"hit"}
    with on_disk(cache_store) as other:
        assert sorted(e.hits for e in other.entries()) == [1] * 40
        assert all(e.last_hit is not None for e in other.entries())


def test_entries_are_on_disk_when_the_run_raises(counts, job_store, cache_store, run_dir):
    a = jobs.add(1, 2)
    b = jobs.add(a.output, 3)
    flow = Flow([a, b, jobs.fail_job(b.output)])
    with pytest.raises(ValueError, match="always fails"):
        run_locally(flow, store=job_store, cache=cache_store, log=False, raise_immediately=True)
    with on_disk(cache_store) as other:
        assert other.count() == 2, "the two jobs that succeeded are recorded"
        assert {e.name for e in other.entries()} == {"add"}


def test_a_call_repeated_in_one_run_is_served_from_the_queue(
    counts, job_store, cache_store, run_dir
):
    first, again = jobs.add(5, 6), jobs.add(5, 6)
    run_locally(Flow([first, again]), store=job_store, cache=cache_store, log=False)
    assert counts() == {"add": 1}
    assert meta(job_store, again.uuid)["outcome"] == "hit"
    assert job_store.get_output(again.uuid) == 11
    with on_disk(cache_store) as other:
        (entry,) = other.entries()
        assert entry.hits == 1


def test_outside_a_run_entries_are_written_at_once(counts, job_store, run_dir):
    """@cached_job under another manager: the default cache writes each entry as it goes."""
    jobflow_run_locally(jobs.cached_add(2, 3), store=job_store, log=False)
    with CacheStore() as cache:
        assert cache.count() == 1, "written before the job returned, with no run to flush it"


def test_the_writer_ends_with_the_run(counts, job_store, cache_store, run_dir):
    session = Cache(cache_store)
    with session.activate():
        pass  # nothing queued: leaving writes nothing and raises nothing
    run_locally(jobs.add(7, 1), store=job_store, cache=session, log=False)
    assert session.store_session.writer is None
    with on_disk(cache_store) as other:
        assert other.count() == 1


KILLED_RUN = """
import os, signal, time
from jobflow import Flow, job
from jobflow_cache import run_locally
from tests.support import jobs

@job
def die(value):
    time.sleep(3)  # the entries of the jobs before are due meanwhile
    os.kill(os.getpid(), signal.SIGKILL)

a = jobs.add(1, 1)
b = jobs.add(a.output, 1)
run_locally(Flow([a, b, die(b.output)]), log=False)
"""


def test_sigkill_during_a_run_keeps_the_entries_written_behind(counts, tmp_path):
    """Entries queued more than a moment before the process is killed are on disk, whole."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN], env=env, cwd=tmp_path, timeout=600, check=False
    )
    assert proc.returncode == -signal.SIGKILL
    assert counts() == {"add": 2}
    with CacheStore() as cache:
        entries = list(cache.entries())
        assert sorted(e.output for e in entries) == ["2", "3"]
        assert all(cache.lookup(e.digest).outcome is Outcome.HIT for e in entries)


def test_a_large_shared_run_folder_warns_once(counts, job_store, cache_store, run_dir):
    for i in range(LARGE_FOLDER):
        (run_dir / f"data{i}.txt").write_text("x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_locally(fan(3), store=job_store, cache=cache_store, log=False, ensure_success=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(messages) == 1
    assert f"holds {LARGE_FOLDER} files" in messages[0]
    assert counts() == {"add": 3}
    assert cache_store.count() == 3


@job
def write_named(name: str, size: int):
    """Write ``size`` bytes to a file called ``name`` in the run folder."""
    Path(name).write_bytes(b"x" * size)
    return size


@pytest.fixture
def refusing_cache(tmp_path):
    """A real SQLite cache that refuses the entries of ``write_named``, as a backend refuses a
    document it cannot hold (MongoDB's 16 MB limit, a full disk). Neither can be produced on
    demand here, so this one backend's ``write`` is wrapped (its type stays SQLiteBackend, so
    the run batches its writes exactly as for any SQLite cache)."""
    backend = SQLiteBackend(tmp_path / "refusing.sqlite")
    write = backend.write

    def refusing_write(docs):
        if any(str(d.get("function", "")).endswith(":write_named") for d in docs):
            raise ValueError("document refused by the backend")
        write(docs)

    backend.write = refusing_write  # type: ignore[method-assign]
    return CacheStore(backend, tmp_path / "objects")


def test_an_entry_that_cannot_be_written_warns_when_the_run_ends(
    counts, job_store, refusing_cache, run_dir
):
    """A backend refuses one entry: the run still succeeds, the other entries are written,
    and one CacheWarning says so."""
    cache_store = refusing_cache
    bad, good = write_named("result", 10), jobs.add(1, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_locally(Flow([bad, good]), store=job_store, cache=cache_store, log=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(messages) == 1
    assert "1 job result(s) were not cached" in messages[0]
    assert job_store.get_output(bad.uuid) == 10
    assert job_store.get_output(good.uuid) == 3
    assert [e.name for e in cache_store.entries()] == ["add"]


@pytest.mark.warnings_logged
def test_a_failed_run_is_not_hidden_by_an_unwritable_entry(
    counts, job_store, refusing_cache, run_dir, caplog
):
    cache_store = refusing_cache
    bad = write_named("result", 10)
    flow = Flow([bad, jobs.fail_job(bad.output)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        with pytest.raises(ValueError, match="always fails"):
            run_locally(flow, store=job_store, cache=cache_store, log=False, raise_immediately=True)
    assert "were not cached" in caplog.text


@pytest.mark.warnings_logged
def test_a_cache_warning_never_fails_a_job_where_warnings_are_errors(
    counts, job_store, cache_store, run_dir, caplog
):
    """Under ``-W error`` (or pytest's filterwarnings) a CacheWarning would fail the job it is
    raised in: it is logged instead, and the job and its recording go on."""
    for i in range(LARGE_FOLDER):  # a shared run folder large enough to warn
        (run_dir / f"f{i}").touch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_locally(jobs.add(1, 2), store=job_store, cache=cache_store, log=False)
    assert counts() == {"add": 1}
    assert job_store.query_one({"name": "add"})["output"] == 3
    assert cache_store.count() == 1, "the job was recorded all the same"
    (record,) = [r for r in caplog.records if getattr(r, "jfc_swallowed_warning", False)]
    assert "holds 2000 files" in record.getMessage()


def test_a_hashed_call_keeps_every_field_of_the_call():
    """``Call.hashed`` builds the call field by field: none may be dropped or reordered."""
    import dataclasses

    from jobflow_cache.execution.call import Call, Refs
    from jobflow_cache.execution.options import JobOptions
    from jobflow_cache.hashing import digest_call

    job_ = jobs.add(1, 2)
    values = {
        "job": job_,
        "function": jobs.add.original,
        "args": (1, 2),
        "kwargs": {"b": 2},
        "options": JobOptions(ignore=("b",)),
        "mode": "read_only",
        "files": "none",
        "refs": Refs(),
        "call_digest": None,
    }
    assert [f.name for f in dataclasses.fields(Call)] == list(values)
    call = Call(**values)
    digest = digest_call("m:f", {"a": 1})
    hashed = call.hashed(digest)
    for name, value in values.items():
        assert getattr(hashed, name) is (digest if name == "call_digest" else value), name
