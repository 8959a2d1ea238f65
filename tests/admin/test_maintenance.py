"""Maintenance without the CLI: selections, digest prefixes, verify, purge + gc, stats, explain.

Caches are built by running real jobflow flows through ``jobflow_cache.run_locally``; damage is
done to the real SQLite store and the real object area.
"""

from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from jobflow import Flow, JobStore
from maggma.stores import MemoryStore

from jobflow_cache import (
    CacheEntry,
    CacheStore,
    CacheWarning,
    ObjectArea,
    Outcome,
    SQLiteBackend,
    run_locally,
)
from jobflow_cache.admin.explain import MISSING, Inputs, compare, diff, nearest, render
from jobflow_cache.admin.listing import (
    AmbiguousDigestError,
    Filters,
    UnknownDigestError,
    iter_rows,
    parse_age,
    resolve_prefix,
    short_digest,
    stats,
)
from jobflow_cache.admin.purge import collect_garbage, purge
from jobflow_cache.admin.verify import ProblemKind, verify
from tests.support import jobs


def run(flow, cache, root: Path, job_store: JobStore | None = None) -> None:
    run_locally(flow, store=job_store, cache=cache, log=False, create_folders=True, root_dir=root)


def relax_pair() -> Flow:
    """Two relaxations whose OUTCARs have the same content (one shared file object)."""
    a = jobs.RelaxMaker(name="a").make(1.0)
    b = jobs.RelaxMaker(name="b").make(1.0)
    return Flow([a, b])


@pytest.fixture
def built(cache_store, tmp_path, counts):
    """A cache of a real flow: two relaxations sharing a file object, a files job, an add."""
    root = tmp_path / "runs"
    root.mkdir()
    flow = Flow([relax_pair(), jobs.write_files("x", 20), jobs.add(1, 2)])
    run(flow, cache_store, root)
    cache_store.connect()
    assert cache_store.count() == 4
    return cache_store


def entry_of(cache: CacheStore, name: str) -> CacheEntry:
    (doc,) = cache.find({"name": name})
    return CacheEntry.from_document(doc)


def object_path(cache: CacheStore, xxh3: str) -> Path:
    return ObjectArea(cache.objects_dir).path_of(xxh3)


def put_raw(cache: CacheStore, doc: dict) -> None:
    doc.pop("_id", None)
    cache.backend.write([doc])


# --------------------------------------------------------------------------- selecting


def test_parse_age_and_bad_durations():
    assert parse_age("2w") == timedelta(days=14)
    assert parse_age("1h30m") == timedelta(minutes=90)
    for bad in ("", "30", "d", "3x", "1d junk"):
        with pytest.raises(ValueError, match="duration"):
            parse_age(bad)


def test_filters_select_by_name_function_time_and_validity(built):
    cache = built
    names = lambda criteria: sorted(r.name for r in iter_rows(cache, criteria))  # noqa: E731
    assert names(Filters(name="?").criteria()) == ["a", "b"]
    assert names(Filters(name="write*").criteria()) == ["write_files"]
    assert names(Filters(function="tests.support.jobs:add").criteria()) == ["add"]
    assert names(Filters(function="*RelaxMaker*").criteria()) == ["a", "b"]
    assert names(Filters(invalid=True).criteria()) == []
    cache.invalidate(entry_of(cache, "add").digest, "test")
    assert names(Filters(invalid=True).criteria()) == ["add"]
    assert names(Filters(invalid=False).criteria()) == ["a", "b", "write_files"]

    # back-date one entry (created/last_hit are book-keeping: the checksum stays valid)
    old = dict(next(cache.find({"name": "a"})))
    old["created"] = datetime.now(timezone.utc) - timedelta(days=40)
    put_raw(cache, old)
    month_ago = datetime.now(timezone.utc) - timedelta(days=30)
    assert names(Filters(before=month_ago).criteria()) == ["a"]
    assert "a" not in names(Filters(since=month_ago).criteria())
    assert names(Filters(unused_since=month_ago).criteria()) == ["a"]
    old["last_hit"] = datetime.now(timezone.utc)  # served recently: in use again
    put_raw(cache, old)
    assert names(Filters(unused_since=month_ago).criteria()) == []
    assert cache.lookup(old["digest"]).outcome is Outcome.HIT


def test_rows_sort_and_limit(built):
    rows = list(iter_rows(built, {}, sort="size", limit=2))
    assert next(r.name for r in rows) == "write_files"
    assert rows[0].files == 2
    assert rows[0].files_size == 20 * 2 + 20
    assert len(list(iter_rows(built, {}, limit=3))) == 3
    newest_first = [r.created for r in iter_rows(built, {})]
    assert newest_first == sorted(newest_first, reverse=True)


def sealed(digest: str, name: str = "x") -> CacheEntry:
    return CacheEntry(digest=digest, scheme="jfc1", function="m:f", name=name).seal()


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_prefixes_unique_unknown_ambiguous(tmp_path, backend):
    store = SQLiteBackend(tmp_path / "c.sqlite") if backend == "sqlite" else MemoryStore()
    with CacheStore(store, tmp_path / "objects") as cache:
        twins = ["abcdef0123" + "0" * 22, "abcdef0123" + "1" * 22]
        for i, digest in enumerate([*twins, "abce" + "2" * 28, "f" * 32]):
            cache.put(sealed(digest, f"e{i}"))
        assert short_digest(cache, twins[0]) == twins[0][:11]
        assert short_digest(cache, "f" * 32) == "f" * 8
        assert short_digest(cache, "abce" + "2" * 28) == "abce2222"
        assert resolve_prefix(cache, "ABCE") == "abce" + "2" * 28  # case-insensitive
        assert resolve_prefix(cache, twins[1][:11]) == twins[1]
        with pytest.raises(AmbiguousDigestError) as err:
            resolve_prefix(cache, "abcd")
        assert {d for d, _ in err.value.candidates} == set(twins)
        assert twins[0] in str(err.value)
        assert "(e0)" in str(err.value)
        with pytest.raises(UnknownDigestError):
            resolve_prefix(cache, "0000")
        for bad in ("abc", "xyz1", "a" * 33):
            with pytest.raises(ValueError, match="digest prefix"):
                resolve_prefix(cache, bad)


# --------------------------------------------------------------------------- verify


def test_verify_sound_cache(built):
    checked = []
    assert verify(built, on_entry=lambda: checked.append(1)) == []
    assert len(checked) == 4


def test_verify_catches_a_removed_file_object(built):
    entry = entry_of(built, "write_files")
    record = entry.files[0]
    object_path(built, record.xxh3).unlink()
    (problem,) = verify(built)
    assert problem.kind is ProblemKind.FILE_MISSING
    assert (problem.digest, problem.path) == (entry.digest, record.path)


def test_verify_catches_a_modified_file_object(built):
    entry = entry_of(built, "write_files")
    record = next(r for r in entry.files if r.path == "result.txt")
    path = object_path(built, record.xxh3)
    os.chmod(path, stat.S_IWUSR | stat.S_IRUSR)  # objects are read-only
    path.write_text("y\n" * 20)  # same size, other content
    (quick,) = verify(built, hash_files=False)  # the write broke the object's seal
    assert quick.kind is ProblemKind.FILE_CORRUPT
    (problem,) = verify(built)
    assert problem.kind is ProblemKind.FILE_CORRUPT
    assert "xxh3" in problem.message
    assert problem.digest == entry.digest
    path.write_text("longer content")
    (problem,) = verify(built, hash_files=False)
    assert problem.kind is ProblemKind.FILE_CORRUPT
    assert "size" in problem.message


def test_verify_catches_output_altered_in_the_store(built):
    doc = dict(next(built.find({"name": "add"})))
    doc["output"] = "4"  # the job returned 3
    put_raw(built, doc)
    (problem,) = verify(built)
    assert (problem.kind, problem.digest) == (ProblemKind.CHECKSUM, doc["digest"])
    doc["output"] = '{"not json'
    put_raw(built, doc)
    kinds = sorted(p.kind.value for p in verify(built))
    assert kinds == ["checksum"]  # altered text is not parsed: the checksum says enough


def test_verify_never_parses_an_altered_output(built, monkeypatch):
    import jobflow_cache.admin.verify as verify_module

    parsed: list[str] = []
    real = verify_module.loads
    monkeypatch.setattr(verify_module, "loads", lambda text: parsed.append(text) or real(text))
    doc = dict(next(built.find({"name": "add"})))
    verify(built)
    assert doc["output"] in parsed  # a sound entry's output is decoded
    parsed.clear()
    doc["output"] = '{"@module": "os", "@class": "system"}'
    put_raw(built, doc)
    (problem,) = verify(built)
    assert problem.kind is ProblemKind.CHECKSUM
    assert doc["output"] not in parsed


def test_verify_catches_a_missing_object_area(built):
    area = ObjectArea(built.objects_dir)
    for xxh3, _ in list(area.iter_objects()):
        os.chmod(area.path_of(xxh3).parent, 0o755)
    os.rename(built.objects_dir, built.objects_dir + ".gone")
    problems = verify(built)
    kinds = [p.kind for p in problems]
    assert kinds.count(ProblemKind.AREA_MISSING) == 1
    assert kinds.count(ProblemKind.FILE_MISSING) == 4  # a, b (OUTCAR) + write_files (2)


def test_verify_catches_garbage_scheme_and_tampered_inputs(built):
    put_raw(built, {"digest": "9" * 32, "junk": True})
    doc = dict(next(built.find({"name": "a"})))
    doc["scheme"] = "jfc0"
    put_raw(built, doc)
    doc = dict(next(built.find({"name": "b"})))
    doc["arg_digests"] = {**doc["arg_digests"], "value": "0" * 32}
    put_raw(built, doc)
    found = {p.kind: p.digest for p in verify(built)}
    assert found[ProblemKind.UNDECODABLE] == "9" * 32
    assert found[ProblemKind.SCHEME] == entry_of(built, "a").digest
    assert found[ProblemKind.INPUTS] == doc["digest"]


def test_verify_fix_repairs_and_the_job_runs_again(built, tmp_path, counts):
    put_raw(built, {"digest": "9" * 32, "junk": True})
    entry = entry_of(built, "write_files")
    record = next(r for r in entry.files if r.path == "result.txt")
    path = object_path(built, record.xxh3)
    os.chmod(path, 0o644)
    path.write_text("tampered")
    problems = verify(built, fix=True)
    assert {(p.kind, p.fixed) for p in problems} == {
        (ProblemKind.UNDECODABLE, "removed"),
        (ProblemKind.FILE_CORRUPT, "invalidated"),
    }
    assert not path.exists(), "a corrupt object is deleted so a sound copy can be stored"
    assert built.count({"digest": "9" * 32}) == 0
    assert built.lookup(entry.digest).outcome is Outcome.INVALID
    assert verify(built) == []  # invalid entries are never served: nothing left to fix

    counts.reset()
    root = tmp_path / "again"
    root.mkdir()
    with pytest.warns(CacheWarning, match="marked invalid: verify: file-corrupt"):
        run(Flow([jobs.write_files("x", 20), jobs.add(1, 2)]), built, root)
    assert counts() == {"write_files": 1}  # the repaired job ran, the sound one was served
    built.connect()
    assert built.lookup(entry.digest).outcome is Outcome.HIT
    assert path.read_text() == "x\n" * 20
    assert verify(built) == []


# --------------------------------------------------------------------------- purge and gc


def test_purge_dry_run_deletes_nothing(built):
    objects = sorted(ObjectArea(built.objects_dir).iter_objects())
    report = purge(built, {}, dry_run=True)
    assert report.entries == 4
    assert report.dry_run
    assert report.gc.objects == len(objects) == 3  # a and b share their OUTCAR
    assert built.count() == 4
    assert sorted(ObjectArea(built.objects_dir).iter_objects()) == objects
    assert verify(built) == []


def test_purge_keeps_objects_another_entry_references(built):
    a, b = entry_of(built, "a"), entry_of(built, "b")
    assert a.files[0].xxh3 == b.files[0].xxh3
    shared = object_path(built, a.files[0].xxh3)

    dry = purge(built, Filters(name="a").criteria(), dry_run=True)
    assert (dry.entries, dry.gc.objects) == (1, 0)
    report = purge(built, Filters(name="a").criteria())
    assert (report.entries, report.digests, report.gc.objects) == (1, [a.digest], 0)
    assert shared.exists()
    assert built.lookup(b.digest).outcome is Outcome.HIT

    built.invalidate(b.digest, "kept for inspection")  # an invalid entry still holds it
    assert collect_garbage(built).objects == 0
    assert shared.exists()

    report = purge(built, Filters(name="b").criteria())
    assert report.entries == 1
    assert report.gc.objects == 1
    # the run folders still hard-link the object: its bytes come back once they go
    assert report.gc.bytes_freed + report.gc.bytes_linked == b.files_size
    assert not shared.exists()
    assert built.count() == 2
    assert verify(built) == []


def test_purge_all_and_gc_of_orphans(built, tmp_path):
    orphan = tmp_path / "orphan.txt"
    orphan.write_text("left behind by a crash")
    xxh3 = ObjectArea(built.objects_dir).ingest(orphan, mode="copy")
    os.utime(object_path(built, xxh3), (0, 0))
    assert collect_garbage(built, dry_run=True).objects == 1
    assert object_path(built, xxh3).exists()
    report = collect_garbage(built)
    assert (report.objects, report.bytes_freed) == (1, len("left behind by a crash"))
    assert not object_path(built, xxh3).exists()
    assert verify(built) == []
    report = purge(built, {})
    assert report.entries == 4
    assert report.gc.objects == 3
    assert built.count() == 0
    assert list(ObjectArea(built.objects_dir).iter_objects()) == []


# --------------------------------------------------------------------------- stats


def test_stats_sqlite_and_streamed_agree(cache_store, tmp_path, counts):
    root = tmp_path / "runs"
    root.mkdir()
    memory = CacheStore(MemoryStore(), tmp_path / "mem-objects")
    for cache in (cache_store, memory):
        run(relax_pair(), cache, root)
        run(Flow([jobs.RelaxMaker(name="a").make(1.0), jobs.add(2, 2)]), cache, root)
    results = []
    for cache in (cache_store, memory):
        cache.connect()
        cache.invalidate(next(cache.find({"name": "add"}))["digest"], "test")
        results.append(stats(cache))
    for result in results:
        assert (result.entries, result.invalid, result.hits) == (3, 1, 1)
        assert result.functions == {
            "tests.support.jobs:RelaxMaker.make": 2,
            "tests.support.jobs:add": 1,
        }
        assert result.objects == 1
        assert result.files_bytes == 2 * result.objects_bytes
        assert result.dedup_ratio == 2.0
        assert result.oldest <= result.newest
    fast, streamed = (r.to_dict() for r in results)
    for key in ("oldest", "newest", "time_saved"):
        fast.pop(key), streamed.pop(key)
    assert fast == streamed


# --------------------------------------------------------------------------- explain


def test_diff_paths_and_readable_tags():
    cached = {
        "@module": "m",
        "@class": "Relax",
        "incar": {"ENCUT": 520, "ISMEAR": 0},
        "kpts": [4, 4, 4],
        "x": {"\x00float": "nan"},
    }
    now = {
        "@module": "m",
        "@class": "Relax",
        "incar": {"ENCUT": 600},
        "kpts": [4, 4],
        "x": 1.0,
    }
    found = {d.path: (d.cached, d.now) for d in diff(cached, now, "self")}
    assert found == {
        "self.incar.ENCUT": (520, 600),
        "self.incar.ISMEAR": (0, MISSING),
        "self.kpts[2]": (4, MISSING),
        "self.x": ({"\x00float": "nan"}, 1.0),
    }
    assert [d.describe() for d in diff({"a b": True}, {"a b": 1}, "arg")] == [
        "arg['a b']: True -> 1"
    ]
    assert render({"\x00hook": ["dir", ["0123456789ab", "OUTCAR"]]}) == (
        "<run folder of job 01234567>/OUTCAR"
    )
    assert render({"\x00set": [1, 2]}) == "{1, 2}"
    assert render(list(range(100)), width=20).endswith("…")


def test_nearest_names_the_differing_argument_and_field(cache_store, tmp_path, counts):
    root = tmp_path / "runs"
    root.mkdir()
    run(jobs.RelaxMaker(name="r", steps=10).make(1.0), cache_store, root)
    run(jobs.RelaxMaker(name="r", steps=10).make(2.0), cache_store, root)
    run(jobs.RelaxMaker(name="r", steps=20).make(1.0), cache_store, root)
    run(jobs.takes_anything(np.arange(3.0)), cache_store, root)
    run(jobs.takes_anything(np.arange(4.0)), cache_store, root)
    cache_store.connect()
    newest = next(
        cache_store.find({"function": "tests.support.jobs:RelaxMaker.make"}, sort={"created": -1})
    )
    now = Inputs.from_document(newest)
    comparisons, ranked = nearest(cache_store, now, exclude=frozenset({newest["digest"]}))
    assert ranked == 2
    best, other = comparisons
    assert (best.equal, best.changed) == (["value"], ["self"])
    assert [d.describe() for d in best.differences] == ["self.steps: 10 -> 20"]
    assert sorted(other.changed) == ["self", "value"]

    arrays = list(
        cache_store.find({"function": "tests.support.jobs:takes_anything"}, sort={"created": 1})
    )
    comparison = compare(Inputs.from_document(arrays[1]), Inputs.from_document(arrays[0]))
    (difference,) = comparison.differences
    assert difference.path == "value"
    assert render(difference.cached).startswith("ndarray(<f8, (3,), xxh3 ")
    assert render(difference.now).startswith("ndarray(<f8, (4,), xxh3 ")


def test_compare_without_canonical_input_names_the_argument():
    cached = Inputs("m:f", "1", {"a": "x", "b": "y"}, None)
    now = Inputs("m:f", "2", {"a": "x", "b": "z", "c": "w"}, {"a": 1, "b": 2, "c": 3})
    result = compare(now, cached)
    assert result.cache_version == ("1", "2")
    assert (result.equal, result.changed, result.only_now) == (["a"], ["b"], ["c"])
    assert result.not_kept == ["b"]
    assert result.differences == []


def test_relative_sqlite_path_is_fixed_at_construction(tmp_path, monkeypatch):
    """A job running in its own folder must reach the store the user named (a settings file)."""
    monkeypatch.chdir(tmp_path)
    backend = SQLiteBackend("relative.sqlite")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    backend.write([{"digest": "d1"}])
    backend.close()
    assert (tmp_path / "relative.sqlite").exists()
    assert not (tmp_path / "run" / "relative.sqlite").exists()
    assert not (tmp_path / "run" / "relative.sqlite").exists()
