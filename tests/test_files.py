"""Tests for jobflow_cache.files: snapshots, the object area, placement and verification."""

from __future__ import annotations

import doctest
import fnmatch
import multiprocessing
import os
import random
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import xxhash

from jobflow_cache import files
from jobflow_cache.errors import CacheError, FilesUnavailableError, FolderConflictError
from jobflow_cache.files import (
    FileRecord,
    ObjectArea,
    changed_files,
    snapshot,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def xxh(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def write(path: Path, data: bytes, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        path.chmod(mode)
    return path


def pick(records: list[FileRecord], path: str) -> FileRecord:
    return next(r for r in records if r.path == path)


def perms(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def leftover_temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".jfc-tmp-")]


@pytest.fixture
def area(tmp_path: Path) -> ObjectArea:
    return ObjectArea(tmp_path / "objects")


@pytest.fixture
def run(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    return folder


@pytest.fixture
def other_fs_dir(tmp_path: Path) -> Iterator[Path]:
    """A scratch folder on a different filesystem than tmp_path (tmpfs /dev/shm)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("/dev/shm is not available, cannot test the cross-filesystem fallback")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as tmp_path, hard links would work")
    with tempfile.TemporaryDirectory(dir=shm, prefix="jfc-test-") as scratch:
        yield Path(scratch)


# --------------------------------------------------------------------------- snapshot


def test_snapshot_records_regular_files_recursively(run: Path) -> None:
    write(run / "INCAR", b"ENCUT = 520")
    write(run / "d1" / "d2" / "deep.txt", b"deep")
    (run / "empty_dir").mkdir()

    snap = snapshot(run)

    # folders are listed too (a new empty folder is part of what a job leaves)
    assert sorted(snap) == ["INCAR", "d1", "d1/d2", "d1/d2/deep.txt", "empty_dir"]
    st = os.stat(run / "d1" / "d2" / "deep.txt")
    assert snap["d1/d2/deep.txt"] == (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns, 0)
    assert snap["empty_dir"][4] == 2


def test_changed_files_new_and_modified_not_untouched(run: Path) -> None:
    write(run / "untouched.txt", b"same")
    modified = write(run / "modified.txt", b"hello")
    before = snapshot(run)

    write(run / "sub" / "dir" / "new.txt", b"new")
    old = os.stat(modified)
    with modified.open("r+b") as fh:  # same size, same inode, different content
        fh.write(b"jello")
    os.utime(modified, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000))
    assert os.stat(modified).st_ino == old.st_ino
    assert os.stat(modified).st_size == old.st_size

    assert changed_files(run, before) == ["modified.txt", "sub/dir/new.txt"]


def test_changed_files_detects_replaced_inode(run: Path) -> None:
    target = write(run / "OUTCAR", b"energy")
    before = snapshot(run)
    old = os.stat(target)

    replacement = write(run / "OUTCAR.new", b"energy")
    os.utime(replacement, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(replacement, target)

    assert os.stat(target).st_mtime_ns == old.st_mtime_ns
    assert changed_files(run, before) == ["OUTCAR"]


def test_changed_files_unchanged_folder_is_empty(run: Path) -> None:
    write(run / "a", b"a")
    write(run / "b" / "c", b"c")
    assert changed_files(run, snapshot(run)) == []


def test_snapshot_exclude_patterns(run: Path) -> None:
    write(run / "keep.txt", b"k")
    write(run / "job.log", b"l")
    write(run / "sub" / "deep.log", b"l")
    write(run / "scratch" / "WAVECAR", b"w")
    write(run / "__pycache__" / "mod.pyc", b"p")
    write(run / "sub" / "keep2.txt", b"k")

    exclude = ["*.log", "scratch/*", "__pycache__"]
    assert sorted(snapshot(run, exclude)) == ["keep.txt", "scratch", "sub", "sub/keep2.txt"]

    before = snapshot(run, exclude)
    write(run / "another.log", b"l")
    write(run / "scratch" / "CHGCAR", b"c")
    write(run / "result.json", b"{}")
    assert changed_files(run, before, exclude) == ["result.json"]


@pytest.mark.parametrize(
    "path",
    [
        "FW.json",
        "d/FW.json",
        "x.lock",
        "a/b.lock",
        "jfremote_1",
        "a/bx",
        "a/dx",
        "xzy",
        "x/y",
        "bq",
        "aq",
        "sub/t.log",
        "sub/d/t.log",
        "q/z",
        "z",
        "a\nb.lock",
        "FW.jsonx",
        "[x]",
        ".h",
    ],
)
def test_exclusion_matches_fnmatchcase_of_path_or_basename(path: str) -> None:
    """One compiled regex for all patterns: the same answer as fnmatchcase pattern by pattern."""
    patterns = [
        "FW.json",
        "*.lock",
        "jfremote_*",
        "a/[bc]*",
        "x?y",
        "[!a]q",
        "sub/*.log",
        "z",
        "[[]x]",
        ".*",
    ]
    expected = any(
        fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path.rpartition("/")[2], p)
        for p in patterns
    )
    assert files._is_excluded(path, patterns) is expected
    assert files._is_excluded(path, []) is False


def test_snapshot_lists_symlinks_without_following_them(run: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "secret.txt", b"secret")
    write(run / "real.txt", b"real")
    before = snapshot(run)

    (run / "file_link").symlink_to(outside / "secret.txt")
    (run / "dir_link").symlink_to(outside, target_is_directory=True)

    after = snapshot(run)
    assert sorted(after) == ["dir_link", "file_link", "real.txt"]  # nothing below dir_link
    assert after.targets == {"file_link": str(outside / "secret.txt"), "dir_link": str(outside)}
    assert changed_files(run, before) == []  # regular files only
    assert files.changed_paths(before, after) == ["dir_link", "file_link"]


def test_snapshot_of_missing_folder_is_empty(tmp_path: Path) -> None:
    folder = tmp_path / "not_yet"
    before = snapshot(folder)
    assert before == {}
    write(folder / "created.txt", b"x")
    assert changed_files(folder, before) == ["created.txt"]


# --------------------------------------------------------------------------- ingest / record


def test_ingest_copy_hash_read_only_and_source_untouched(area: ObjectArea, run: Path) -> None:
    content = b"total energy = -10.5 eV\n"
    src = write(run / "OUTCAR", content, mode=0o644)

    digest = area.ingest(src, mode="copy")

    obj = area.path_of(digest)
    assert digest == xxh(content)
    assert obj == area.root / digest[:2] / digest[2:]
    assert obj.read_bytes() == content
    assert perms(obj) == 0o444
    assert os.stat(obj).st_ino != os.stat(src).st_ino
    assert perms(src) == 0o644
    assert leftover_temps(area.root) == []


def test_ingest_never_links_or_changes_the_source(area: ObjectArea, run: Path) -> None:
    content = b"linked content"
    src = write(run / "vasprun.xml", content, mode=0o644)
    before = os.stat(src)

    digest = area.ingest(src, mode="link")  # "link" no longer hard-links the user's file

    obj = area.path_of(digest)
    assert digest == xxh(content)
    after = os.stat(src)
    assert os.stat(obj).st_ino != after.st_ino
    assert (after.st_ino, after.st_mode, after.st_mtime_ns, after.st_nlink) == (
        before.st_ino,
        before.st_mode,
        before.st_mtime_ns,
        1,
    )
    assert perms(obj) == 0o444
    assert files.known_digest(after) == digest  # remembered: the next job's "before" state
    assert leftover_temps(area.root) == []


@pytest.mark.parametrize("mode", ["link", "copy"])
def test_ingest_dedups_equal_content(area: ObjectArea, run: Path, mode: str) -> None:
    content = b"duplicate" * 100
    first = write(run / "a.txt", content)
    second = write(run / "sub" / "b.txt", content)

    d1 = area.ingest(first, mode=mode)  # type: ignore[arg-type]
    object_ino = os.stat(area.path_of(d1)).st_ino
    d2 = area.ingest(second, mode=mode)  # type: ignore[arg-type]

    assert d1 == d2 == xxh(content)
    assert list(area.iter_objects()) == [(d1, len(content))]
    obj_stat = os.stat(area.path_of(d1))
    assert obj_stat.st_ino == object_ino  # the existing object was not rewritten
    # the object is a copy in either mode: no run-folder file shares its inode
    assert obj_stat.st_nlink == 1
    assert os.stat(first).st_ino != obj_stat.st_ino
    assert os.stat(second).st_ino != obj_stat.st_ino
    assert os.stat(second).st_nlink == 1
    assert leftover_temps(area.root) == []


@pytest.mark.parametrize("size", [0, 1, files.CHUNK_SIZE, 3 * files.CHUNK_SIZE + 17])
def test_ingest_hash_matches_xxh3_across_chunk_boundaries(
    area: ObjectArea, run: Path, size: int
) -> None:
    content = random.Random(size).randbytes(size)
    src = write(run / "blob.bin", content)
    digest = area.ingest(src, mode="copy")
    assert digest == xxh(content)
    assert area.path_of(digest).read_bytes() == content


def test_ingest_refuses_symlink(area: ObjectArea, run: Path) -> None:
    target = write(run / "target.txt", b"t")
    link = run / "link.txt"
    link.symlink_to(target)
    with pytest.raises(CacheError, match="not a regular file"):
        area.ingest(link)
    assert list(area.iter_objects()) == []


def test_record_manifest_sorted_with_modes(area: ObjectArea, run: Path) -> None:
    write(run / "z_last.txt", b"last", mode=0o644)
    write(run / "run.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
    write(run / "sub" / "data.bin", b"\x00\x01\x02", mode=0o600)

    records = area.record(run, ["z_last.txt", "./run.sh", "sub/data.bin", "run.sh"], mode="link")

    assert [r.path for r in records] == ["run.sh", "sub/data.bin", "z_last.txt"]
    by_path = {r.path: r for r in records}
    assert by_path["run.sh"] == FileRecord(
        path="run.sh", size=18, xxh3=xxh(b"#!/bin/sh\necho hi\n"), mode=0o755
    )
    assert by_path["sub/data.bin"].mode == 0o600
    assert by_path["z_last.txt"].mode == 0o644
    assert by_path["z_last.txt"].size == 4
    # recording never changes the user's files
    assert perms(run / "run.sh") == 0o755
    assert area.has_all(records)


def test_record_roundtrips_as_json(area: ObjectArea, run: Path) -> None:
    write(run / "a", b"a")
    records = area.record(run, ["a"], mode="copy")
    dumped = [r.model_dump_json() for r in records]
    assert [FileRecord.model_validate_json(d) for d in dumped] == records


@pytest.mark.parametrize(
    ("relpath", "cause"),
    [
        ("missing.txt", FileNotFoundError),
        ("../outside.txt", ValueError),
        ("/etc/hostname", ValueError),
        ("link.txt", ValueError),
        ("linkdir/secret.txt", ValueError),
    ],
)
def test_record_failure_raises_chained_cache_error(
    area: ObjectArea, run: Path, tmp_path: Path, relpath: str, cause: type[Exception]
) -> None:
    write(tmp_path / "outside.txt", b"outside")
    write(tmp_path / "secrets" / "secret.txt", b"secret")
    write(run / "good.txt", b"good")
    (run / "link.txt").symlink_to(tmp_path / "outside.txt")
    (run / "linkdir").symlink_to(tmp_path / "secrets", target_is_directory=True)

    with pytest.raises(CacheError) as info:
        area.record(run, ["good.txt", relpath], mode="copy")

    assert isinstance(info.value.__cause__, cause)
    assert relpath in str(info.value)
    assert xxh(b"outside") not in {d for d, _ in area.iter_objects()}
    assert xxh(b"secret") not in {d for d, _ in area.iter_objects()}


# --------------------------------------------------------------------------- materialize


@pytest.fixture
def recorded(area: ObjectArea, run: Path) -> list[FileRecord]:
    write(run / "run.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
    write(run / "out" / "OUTCAR", b"energy = -3.2\n", mode=0o644)
    return area.record(run, ["run.sh", "out/OUTCAR"], mode="copy")


@pytest.mark.skipif(IS_ROOT, reason="as root, link mode places copies")
def test_materialize_link_shares_object_inode(
    area: ObjectArea, recorded: list[FileRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "LINK_MIN_SIZE", 0)
    dest = tmp_path / "new_run"
    nlinks = {r.path: os.stat(area.path_of(r.xxh3)).st_nlink for r in recorded}

    placed = area.materialize(recorded, dest, mode="link")

    assert placed == [dest / r.path for r in recorded]
    for record, path in zip(recorded, placed):
        obj = area.path_of(record.xxh3)
        assert os.stat(path).st_ino == os.stat(obj).st_ino
        assert os.stat(obj).st_nlink == nlinks[record.path] + 1
        assert path.read_bytes() == obj.read_bytes()
        assert perms(path) == 0o444
    assert leftover_temps(dest) == []


def test_materialize_copy_is_writable_with_recorded_mode(
    area: ObjectArea, recorded: list[FileRecord], tmp_path: Path
) -> None:
    dest = tmp_path / "new_run"
    nlinks = {r.path: os.stat(area.path_of(r.xxh3)).st_nlink for r in recorded}

    placed = area.materialize(recorded, dest, mode="copy")

    for record, path in zip(recorded, placed):
        obj = area.path_of(record.xxh3)
        assert os.stat(path).st_ino != os.stat(obj).st_ino
        assert os.stat(obj).st_nlink == nlinks[record.path]
        assert path.read_bytes() == obj.read_bytes()
        assert perms(path) == record.mode
    assert perms(dest / "run.sh") == 0o755
    assert os.access(dest / "run.sh", os.X_OK)
    assert perms(dest / "out" / "OUTCAR") & stat.S_IWUSR
    (dest / "out" / "OUTCAR").write_bytes(b"changed")  # writing the copy ...
    assert area.verify(recorded[0]) is None  # ... leaves the cache intact
    assert area.verify(recorded[1]) is None
    assert leftover_temps(dest) == []


@pytest.mark.skipif(IS_ROOT, reason="root ignores permission bits, so the write would succeed")
def test_materialize_link_rejects_in_place_write(
    area: ObjectArea, recorded: list[FileRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "LINK_MIN_SIZE", 0)
    placed = area.materialize(recorded, tmp_path / "new_run", mode="link")
    with pytest.raises(PermissionError):
        placed[0].open("r+b")
    assert area.verify(recorded[0]) is None


def test_materialize_never_overwrites_a_file_the_job_did_not_find(
    area: ObjectArea, recorded: list[FileRecord], tmp_path: Path
) -> None:
    dest = tmp_path / "new_run"
    stale = write(dest / "out" / "OUTCAR", b"another job's content")
    stale_ino = os.stat(stale).st_ino

    with pytest.raises(FolderConflictError, match="'out/OUTCAR' holds a file of 21 bytes"):
        area.materialize(recorded, dest, mode="copy")
    assert stale.read_bytes() == b"another job's content"
    assert os.stat(stale).st_ino == stale_ino
    assert not (dest / "run.sh").exists(), "nothing is placed when one path disagrees"

    stale.unlink()
    area.materialize(recorded, dest, mode="copy")
    placed = os.stat(dest / "out" / "OUTCAR")
    # twice: the second run finds the recorded content already in place and leaves it
    area.materialize(recorded, dest, mode="link")
    assert os.stat(dest / "out" / "OUTCAR").st_ino == placed.st_ino
    assert sorted(p.name for p in (dest / "out").iterdir()) == ["OUTCAR"]
    assert leftover_temps(dest) == []


def test_materialize_link_falls_back_to_copy_across_filesystems(
    area: ObjectArea, recorded: list[FileRecord], other_fs_dir: Path
) -> None:
    dest = other_fs_dir / "new_run"

    placed = area.materialize(recorded, dest, mode="link")

    for record, path in zip(recorded, placed):
        obj = area.path_of(record.xxh3)
        assert os.stat(path).st_dev != os.stat(obj).st_dev
        assert path.read_bytes() == obj.read_bytes()
        assert perms(path) == record.mode
    assert leftover_temps(dest) == []


def test_ingest_link_falls_back_to_copy_across_filesystems(
    area: ObjectArea, other_fs_dir: Path
) -> None:
    src = write(other_fs_dir / "OUTCAR", b"on tmpfs", mode=0o644)

    digest = area.ingest(src, mode="link")

    obj = area.path_of(digest)
    assert digest == xxh(b"on tmpfs")
    assert os.stat(obj).st_dev != os.stat(src).st_dev
    assert perms(obj) == 0o444
    assert perms(src) == 0o644


def test_materialize_missing_object_touches_nothing(
    area: ObjectArea, recorded: list[FileRecord], tmp_path: Path
) -> None:
    assert [r.path for r in recorded] == ["out/OUTCAR", "run.sh"]
    area.remove(pick(recorded, "out/OUTCAR").xxh3)
    dest = tmp_path / "new_run"

    with pytest.raises(FilesUnavailableError, match="out/OUTCAR") as info:
        area.materialize(recorded, dest, mode="link")

    assert "run.sh" not in str(info.value)
    assert not dest.exists()


def test_materialize_wrong_size_counts_as_missing(
    area: ObjectArea, recorded: list[FileRecord], tmp_path: Path
) -> None:
    script = pick(recorded, "run.sh")
    bad = script.model_copy(update={"size": script.size + 1})
    assert not area.has_all([bad])
    with pytest.raises(FilesUnavailableError, match=r"run\.sh"):
        area.materialize([bad], tmp_path / "new_run")
    assert not (tmp_path / "new_run").exists()


@pytest.mark.parametrize("bad_path", ["../evil.txt", "/tmp/evil.txt", "a/../../evil.txt", ""])
def test_materialize_refuses_path_traversal(
    area: ObjectArea, recorded: list[FileRecord], tmp_path: Path, bad_path: str
) -> None:
    evil = recorded[0].model_copy(update={"path": bad_path})
    dest = tmp_path / "new_run"

    with pytest.raises(FilesUnavailableError, match="refusing"):
        area.materialize([*recorded, evil], dest)

    assert not dest.exists()
    assert not (tmp_path / "evil.txt").exists()


def test_materialize_does_not_walk_through_symlinked_dir(
    area: ObjectArea, recorded: list[FileRecord], tmp_path: Path
) -> None:
    dest = tmp_path / "new_run"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest.mkdir()
    (dest / "out").symlink_to(elsewhere, target_is_directory=True)

    with pytest.raises(FolderConflictError, match="'out' is a symlink"):
        area.materialize(recorded, dest, mode="copy")

    assert list(elsewhere.iterdir()) == []


def test_invalid_object_id_is_never_a_path(
    area: ObjectArea, recorded: list[FileRecord], tmp_path: Path
) -> None:
    evil = recorded[0].model_copy(update={"xxh3": "../../../etc/hostname"})
    with pytest.raises(ValueError, match="xxh3"):
        area.path_of(evil.xxh3)
    assert not area.has_all([evil])
    assert area.verify(evil) == "invalid xxh3"
    with pytest.raises(FilesUnavailableError):
        area.materialize([evil], tmp_path / "new_run")


def test_materialize_copy_detects_corrupt_object(
    area: ObjectArea, recorded: list[FileRecord], tmp_path: Path
) -> None:
    outcar = pick(recorded, "out/OUTCAR")
    obj = area.path_of(outcar.xxh3)
    obj.chmod(0o644)
    obj.write_bytes(b"ENERGY = -3.2\n")  # same size, other content

    with pytest.raises(FilesUnavailableError, match="corrupt"):
        area.materialize([outcar], tmp_path / "new_run", mode="copy")

    assert not (tmp_path / "new_run" / "out" / "OUTCAR").exists()
    assert leftover_temps(tmp_path / "new_run") == []


# --------------------------------------------------------------------------- verify / gc


def test_verify_ok_missing_size_and_tampered(area: ObjectArea, run: Path) -> None:
    write(run / "a.txt", b"0123456789")
    write(run / "b.txt", b"abcdefghij")
    write(run / "c.txt", b"ABCDEFGHIJ")
    rec_a, rec_b, rec_c = area.record(run, ["a.txt", "b.txt", "c.txt"], mode="copy")
    assert [area.verify(r) for r in (rec_a, rec_b, rec_c)] == [None, None, None]

    area.remove(rec_a.xxh3)
    assert area.verify(rec_a) == "missing"

    obj_b = area.path_of(rec_b.xxh3)
    obj_b.chmod(0o644)
    obj_b.write_bytes(b"abcdefghijkl")
    assert area.verify(rec_b) == "size 12 != 10"

    obj_c = area.path_of(rec_c.xxh3)
    obj_c.chmod(0o644)
    with obj_c.open("r+b") as fh:
        fh.write(b"X")
    assert os.stat(obj_c).st_size == rec_c.size
    assert not area.has_all([rec_c])  # the write broke the object's seal ...
    assert area.verify(rec_c) == "xxh3 mismatch"  # ... and its hash no longer matches


def test_iter_objects_and_remove(area: ObjectArea, run: Path) -> None:
    assert list(area.iter_objects()) == []  # root does not exist yet
    write(run / "a", b"aaaa")
    write(run / "b", b"bbbbbbbb")
    records = area.record(run, ["a", "b"], mode="copy")
    write(area.root / ".jfc-tmp-leftover", b"partial")
    write(area.root / records[0].xxh3[:2] / "not-an-object", b"junk")

    objects = list(area.iter_objects())

    assert objects == sorted((r.xxh3, r.size) for r in records)
    assert area.remove(records[1].xxh3) == 8
    assert area.remove(records[1].xxh3) == 0
    assert list(area.iter_objects()) == [(records[0].xxh3, 4)]
    assert not area.has_all(records)


# --------------------------------------------------------------------------- concurrency


def _ingest_worker(
    root: str, src: str, mode: str, barrier: multiprocessing.synchronize.Barrier, queue: object
) -> None:
    try:
        barrier.wait(timeout=60)
        result = ObjectArea(root).ingest(Path(src), mode=mode)  # type: ignore[arg-type]
    except BaseException as err:  # report everything to the parent
        result = f"error: {err!r}"
    queue.put(result)  # type: ignore[attr-defined]


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_concurrent_ingest_of_same_content(tmp_path: Path) -> None:
    content = random.Random(42).randbytes(5 * 1024 * 1024)
    expected = xxh(content)
    root = tmp_path / "objects"
    sources = [write(tmp_path / f"run{i}" / "WAVECAR", content) for i in range(4)]
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_ingest_worker,
            args=(str(root), str(src), "link" if i % 2 else "copy", barrier, queue),
        )
        for i, src in enumerate(sources)
    ]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)

    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    assert results == [expected] * 4
    area = ObjectArea(root)
    assert list(area.iter_objects()) == [(expected, len(content))]
    assert area.path_of(expected).read_bytes() == content
    assert perms(area.path_of(expected)) == 0o444
    assert leftover_temps(root) == []
    assert [p for p in root.rglob("*") if p.is_file()] == [area.path_of(expected)]


def test_module_doctests() -> None:
    result = doctest.testmod(files)
    assert result.attempted > 0
    assert result.failed == 0
