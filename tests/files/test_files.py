"""Tests for jobflow_cache.files: snapshots, the object area, placement and verification."""

from __future__ import annotations

import doctest
import fnmatch
import multiprocessing
import os
import random
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import xxhash

from jobflow_cache.errors import CacheError, FilesUnavailableError, FolderConflictError
from jobflow_cache.files import (
    FileRecord,
    FileState,
    ObjectArea,
    changed_files,
    materialize,
    snapshot,
    snapshots,
)
from jobflow_cache.files import objects as files
from tests.support.paths import pythonpath

if TYPE_CHECKING:
    from collections.abc import Iterator

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
REPO = Path(__file__).resolve().parents[2]


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
    assert snapshots._is_excluded(path, patterns) is expected
    assert snapshots._is_excluded(path, []) is False


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
    monkeypatch.setattr(materialize, "LINK_MIN_SIZE", 0)
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
    monkeypatch.setattr(materialize, "LINK_MIN_SIZE", 0)
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
    pins = root / ".jfc-pins"  # each process's pin file (see ObjectArea.pinned)
    assert [p for p in root.rglob("*") if p.is_file() and pins not in p.parents] == [
        area.path_of(expected)
    ]


@pytest.mark.parametrize("module", [files, snapshots], ids=lambda m: m.__name__)
def test_module_doctests(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted > 0
    assert result.failed == 0


# --------------------------------------------------------------------------- before/after records


def test_record_changes_keeps_before_and_after_states(area: ObjectArea, run: Path) -> None:
    known = write(run / "known.txt", b"written by an earlier job\n")
    area.record(run, ["known.txt"])  # an earlier job recorded it: its digest is remembered
    write(run / "unknown.txt", b"the user's file\n")
    write(run / "WAVECAR", b"wave")
    area.record(run, ["WAVECAR"])
    write(run / "kept.txt", b"untouched", mode=0o640)
    kept = os.stat(run / "kept.txt")
    before = snapshot(run)

    with known.open("a") as fh:
        fh.write("appended\n")
    with (run / "unknown.txt").open("a") as fh:
        fh.write("appended\n")
    (run / "WAVECAR").unlink()
    (run / "latest").symlink_to("known.txt")
    (run / "empty" / "deeper").mkdir(parents=True)
    records = {r.path: r for r in area.record_changes(run, before, snapshot(run))}

    assert sorted(records) == ["WAVECAR", "empty/deeper", "known.txt", "latest", "unknown.txt"]
    assert records["known.txt"].before == FileState(
        size=26, xxh3=xxh(b"written by an earlier job\n")
    )
    assert records["known.txt"].xxh3 == xxh(b"written by an earlier job\nappended\n")
    assert records["unknown.txt"].before == FileState(size=16, xxh3="")  # not known
    assert records["WAVECAR"].kind == "deleted"
    assert records["WAVECAR"].before == FileState(size=4, xxh3=xxh(b"wave"))
    assert (records["latest"].kind, records["latest"].target) == ("symlink", "known.txt")
    assert records["empty/deeper"].kind == "dir"  # "empty" holds it: not recorded itself
    st = os.stat(run / "kept.txt")
    assert (st.st_ino, st.st_mode, st.st_mtime_ns) == (kept.st_ino, kept.st_mode, kept.st_mtime_ns)


def test_materialize_applies_deletions_symlinks_and_folders(area: ObjectArea, run: Path) -> None:
    area = ObjectArea(area.root, serve_code=True)  # "abs" leads out of the run folder
    write(run / "WAVECAR", b"wave")
    area.record(run, ["WAVECAR"])
    before = snapshot(run)
    (run / "WAVECAR").unlink()
    (run / "latest").symlink_to("OUTCAR")
    (run / "abs").symlink_to("/nonexistent/target")
    (run / "scratch").mkdir()
    write(run / "OUTCAR", b"energy")
    records = area.record_changes(run, before, snapshot(run))

    dest = run.parent / "served"
    write(dest / "WAVECAR", b"wave")  # what the recorded job found
    area.materialize(records, dest)
    assert not (dest / "WAVECAR").exists()
    assert os.readlink(dest / "latest") == "OUTCAR"
    assert os.readlink(dest / "abs") == "/nonexistent/target"
    assert (dest / "scratch").is_dir()
    assert not any((dest / "scratch").iterdir())
    assert (dest / "OUTCAR").read_bytes() == b"energy"

    other = run.parent / "other"
    write(other / "WAVECAR", b"a WAVECAR of another job")
    with pytest.raises(FolderConflictError, match="'WAVECAR' holds a file of 24 bytes"):
        area.materialize(records, other)
    assert sorted(p.name for p in other.iterdir()) == ["WAVECAR"], "nothing was changed"


def test_absolute_links_into_the_run_folder_follow_it(area: ObjectArea, run: Path) -> None:
    area = ObjectArea(area.root, serve_code=True)  # "outside" leads out of the run folder
    before = snapshot(run)
    write(run / "OUTCAR", b"energy")
    (run / "inside").symlink_to(run / "OUTCAR")
    (run / "outside").symlink_to("/nonexistent/elsewhere")
    records = area.record_changes(run, before, snapshot(run))
    dest = run.parent / "served"
    area.materialize(records, dest, source_dir=run)
    assert os.readlink(dest / "inside") == str(dest / "OUTCAR")
    assert os.readlink(dest / "outside") == "/nonexistent/elsewhere"
    assert (dest / "inside").read_bytes() == b"energy"
    area.materialize(records, dest, source_dir=run)  # already as the job leaves it


def test_differences_name_what_a_folder_no_longer_holds(area: ObjectArea, run: Path) -> None:
    write(run / "gone.txt", b"g")
    area.record(run, ["gone.txt"])
    before = snapshot(run)
    write(run / "OUTCAR", b"energy")
    (run / "latest").symlink_to("OUTCAR")
    (run / "gone.txt").unlink()
    records = area.record_changes(run, before, snapshot(run))
    assert files.differences(run, records) == []
    write(run / "OUTCAR", b"patched")
    write(run / "gone.txt", b"back")
    assert files.differences(run, records) == ["OUTCAR", "gone.txt"]


def test_materialize_refuses_a_file_whose_before_content_is_unknown(
    area: ObjectArea, run: Path
) -> None:
    write(run / "energies.csv", b"a,1\n")  # the user's file, never hashed by the cache
    before = snapshot(run)
    with (run / "energies.csv").open("a") as fh:
        fh.write("b,2\n")
    records = area.record_changes(run, before, snapshot(run))
    dest = run.parent / "served"
    write(dest / "energies.csv", b"a,1\n")
    with pytest.raises(FolderConflictError, match="content not known"):
        area.materialize(records, dest)
    assert (dest / "energies.csv").read_bytes() == b"a,1\n"
    # a folder that already holds what the job left needs nothing
    write(dest / "energies.csv", b"a,1\nb,2\n")
    area.materialize(records, dest)


def test_unstored_files_come_from_the_source_folder_only_unchanged(
    area: ObjectArea, run: Path
) -> None:
    before = snapshot(run)
    write(run / "big.bin", b"x" * 5000)
    write(run / "small.txt", b"s")
    records = area.record_changes(run, before, snapshot(run), max_size=1000)
    big = pick(records, "big.bin")
    assert (big.stored, big.size, big.xxh3) == (False, 5000, xxh(b"x" * 5000))
    assert list(area.iter_objects()) == [(xxh(b"s"), 1)]
    assert area.has_all(records)
    assert area.verify(big) is None

    area.materialize(records, run.parent / "a", source_dir=run)
    assert (run.parent / "a" / "big.bin").read_bytes() == b"x" * 5000
    write(run / "big.bin", b"y" * 5000)
    with pytest.raises(FolderConflictError, match=r"'big\.bin' was not stored"):
        area.materialize(records, run.parent / "b", source_dir=run)
    assert not (run.parent / "b").exists()
    with pytest.raises(FolderConflictError):
        area.materialize(records, run.parent / "c", source_dir=None)


def test_live_sqlite_files_are_not_recorded(area: ObjectArea, run: Path) -> None:
    import sqlite3

    db = run / "other.sqlite"
    holder = sqlite3.connect(db)
    try:
        holder.execute("PRAGMA journal_mode=WAL")
        holder.execute("CREATE TABLE t (x)")
        holder.commit()
        before = snapshot(run, files.LIVE_FILE_PATTERNS)
        writer = sqlite3.connect(db)
        with writer:
            writer.execute("INSERT INTO t VALUES (1)")
        writer.close()
        write(run / "result.txt", b"r")
        assert (run / "other.sqlite-wal").exists()
        records = area.record_changes(run, before, snapshot(run, files.LIVE_FILE_PATTERNS))
    finally:
        holder.close()
    assert [r.path for r in records] == ["result.txt"]


# --------------------------------------------------------------------------- end to end
# Real flows in fresh processes (tests/support/files_jobs.py), compared file by file with jobflow.


def tree(folder: Path) -> dict[str, object]:
    """Every path below ``folder``: file bytes and mode, symlink target text, or a folder."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                found[rel] = ("symlink", os.readlink(path))
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = (path.read_bytes(), perms(path))
    return found


def job_trees(root: Path) -> list[dict[str, object]]:
    """The trees of the job folders of a create_folders=True run (names differ per run)."""
    return sorted((tree(p) for p in root.iterdir()), key=repr)


def run_flow(
    tmp_path: Path,
    scenario: str,
    root: Path,
    variant: str = "1",
    engine: str = "cache",
    create: bool = False,
    env: dict[str, str] | None = None,
) -> dict[str, int]:
    """Run a scenario's flow in a fresh process; return its executions per job."""
    counts = tmp_path / f"counts-{uuid_hex()}"
    environ = {
        **os.environ,
        "PYTHONPATH": pythonpath(),
        "JFC_COUNTS_FILE": str(counts),
        **(env or {}),
    }
    args = [scenario, str(root), variant, engine, "1" if create else "0"]
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.files_jobs", *args],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = counts.read_text().split() if counts.exists() else []
    return dict(Counter(lines))


def uuid_hex() -> str:
    import uuid

    return uuid.uuid4().hex


def test_shared_folder_append_loses_no_line(tmp_path: Path) -> None:
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    run_flow(tmp_path, "energies", plain, "1", engine="plain")
    assert run_flow(tmp_path, "energies", cached, "1") == {"append_energy": 2}
    assert tree(cached) == tree(plain)

    # a fresh folder, same flow: both served (the second finds what it found when it was
    # recorded: the first job's line), and the folder is jobflow's
    fresh = tmp_path / "fresh"
    assert run_flow(tmp_path, "energies", fresh, "1") == {}
    assert tree(fresh) == tree(plain)

    # rebuilt flow, same folder: the first job reruns (new input) and appends its line; the
    # second finds energies.csv holding that line, not what it found when it was recorded,
    # so it runs too instead of copying its recorded energies.csv over the new line
    run_flow(tmp_path, "energies", plain, "3", engine="plain")
    assert run_flow(tmp_path, "energies", cached, "3") == {"append_energy": 2}
    assert tree(cached) == tree(plain)
    assert (cached / "energies.csv").read_text().count("\n") == 4


def test_a_users_file_the_jobs_append_to(tmp_path: Path) -> None:
    """The user's energies.csv (a header, older than the run): its content before the first
    job is hashed (small, not known yet), so a fresh folder holding the same header is served,
    and one holding another header runs the jobs."""

    def folder(name: str, header: bytes) -> Path:
        path = write(tmp_path / name / "energies.csv", header)
        time.sleep(2.1)  # not hashed in its first two seconds (see files.prehash)
        return path.parent

    plain = folder("plain", b"name,energy\n")
    run_flow(tmp_path, "energies", plain, "1", engine="plain")
    assert run_flow(tmp_path, "energies", folder("first", b"name,energy\n")) == {"append_energy": 2}
    fresh = folder("fresh", b"name,energy\n")
    assert run_flow(tmp_path, "energies", fresh) == {}
    assert tree(fresh) == tree(plain)

    other_plain = folder("other_plain", b"name;energy\n")
    run_flow(tmp_path, "energies", other_plain, "1", engine="plain")
    other = folder("other", b"name;energy\n")
    assert run_flow(tmp_path, "energies", other) == {"append_energy": 2}
    assert tree(other) == tree(other_plain)


def test_prehash_is_bounded_and_skips_known_and_recent_files(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = [write(run / f"old{i}.txt", b"x" * 100 + bytes([i])) for i in range(3)]
    big = write(run / "big.bin", b"b" * (files.PREHASH_MAX_FILE + 1))
    snap = snapshot(run)
    assert files.prehash(run, snap) == 0, "all changed in the last two seconds"
    monkeypatch.setattr(snapshots, "RACY_NS", 0)
    assert files.prehash(run, snap, budget=202) == 202  # two of the three fit the budget
    assert files.prehash(run, snap) == 101  # the third; the first two are known now
    assert files.prehash(run, snap) == 0
    assert files.known_digest(os.stat(old[2])) == xxh(b"x" * 100 + bytes([2]))
    assert files.known_digest(os.stat(big)) is None


def test_served_job_deletes_what_the_job_deleted(tmp_path: Path) -> None:
    plain, first, served = tmp_path / "plain", tmp_path / "first", tmp_path / "served"
    run_flow(tmp_path, "wavecar", plain, engine="plain")
    assert run_flow(tmp_path, "wavecar", first) == {"write_wavecar": 1, "delete_wavecar": 1}
    assert run_flow(tmp_path, "wavecar", served) == {}
    assert not (served / "WAVECAR").exists()
    assert tree(served) == tree(plain) == tree(first)
    # again in the same folders: the same final state as jobflow's rerun
    run_flow(tmp_path, "wavecar", plain, engine="plain")
    assert run_flow(tmp_path, "wavecar", served) == {}
    assert tree(served) == tree(plain)


def test_symlinks_and_empty_folders_are_restored(tmp_path: Path) -> None:
    plain, first, served = tmp_path / "plain", tmp_path / "first", tmp_path / "served"
    env = {"JOBFLOW_CACHE_SERVE_CODE_FILES": "1"}  # "absolute" leads out of the run folder
    run_flow(tmp_path, "links", plain, engine="plain")
    assert run_flow(tmp_path, "links", first, env=env) == {"links_and_dirs": 1}
    assert run_flow(tmp_path, "links", served, env=env) == {}
    assert tree(served) == tree(plain)
    assert os.readlink(served / "absolute") == "/nonexistent/jfc/target"
    assert (served / "scratch" / "empty").is_dir()
    plain_c, first_c, served_c = tmp_path / "plain_c", tmp_path / "first_c", tmp_path / "srv_c"
    run_flow(tmp_path, "links", plain_c, engine="plain", create=True)
    # the same inputs: served from the shared-folder entry into a folder of its own
    assert run_flow(tmp_path, "links", first_c, create=True, env=env) == {}
    assert run_flow(tmp_path, "links", served_c, create=True, env=env) == {}
    assert job_trees(first_c) == job_trees(served_c) == job_trees(plain_c)


@pytest.mark.parametrize("files_mode", ["copy", "link"])
def test_downstream_append_to_a_served_file(
    tmp_path: Path, isolated_cache: Path, files_mode: str
) -> None:
    env = {"JOBFLOW_CACHE_FILES": files_mode}
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    assert run_flow(tmp_path, "downstream", first, "1", create=True, env=env) == {
        "write_out": 1,
        "append_line": 1,
    }
    (first_outcar,) = first.glob("*/OUTCAR")
    # recording left the user's file alone: own inode, writable, mode unchanged
    assert os.stat(first_outcar).st_nlink == 1
    assert perms(first_outcar) == 0o644
    assert first_outcar.read_text() == "energy x\nappended 1\n"

    counts = run_flow(tmp_path, "downstream", second, "2", create=True, env=env)
    assert counts == {"append_line": 1}, "the writer is served, the appender runs"
    (second_outcar,) = second.glob("*/OUTCAR")
    assert second_outcar.read_text() == "energy x\nappended 2\n"
    assert first_outcar.read_text() == "energy x\nappended 1\n", "other run's folder unchanged"

    plain = tmp_path / "plain"
    run_flow(tmp_path, "downstream", plain, "3", engine="plain", create=True)
    assert run_flow(tmp_path, "downstream", third, "3", create=True, env=env) == {"append_line": 1}
    assert job_trees(third) == job_trees(plain)  # the object still holds the writer's file
    area = ObjectArea(isolated_cache / "objects")
    objects = list(area.iter_objects())
    assert objects
    assert all(
        area.verify(FileRecord(path="x", size=size, xxh3=digest)) is None
        for digest, size in objects
    )


@pytest.mark.parametrize(
    "env", [{"JOBFLOW_CACHE_MAX_FILE_SIZE": "1000"}, {"JOBFLOW_CACHE_FILES": "none"}]
)
def test_files_not_stored_are_served_only_from_an_unchanged_source(
    tmp_path: Path, env: dict[str, str]
) -> None:
    plain, first = tmp_path / "plain", tmp_path / "first"
    run_flow(tmp_path, "big", plain, engine="plain")
    assert run_flow(tmp_path, "big", first, env=env) == {"big_file": 1}
    served = tmp_path / "served"
    assert run_flow(tmp_path, "big", served, env=env) == {}
    assert tree(served) == tree(plain)

    (first / "big.bin").write_bytes(b"changed")
    again = tmp_path / "again"
    assert run_flow(tmp_path, "big", again, env=env) == {"big_file": 1}, "the job runs"
    assert tree(again) == tree(plain)


def test_a_live_wal_in_the_shared_folder_is_neither_recorded_nor_replaced(
    tmp_path: Path, isolated_cache: Path
) -> None:
    import sqlite3

    import jobflow_cache
    from jobflow_cache.store import CacheStore
    from tests.support import files_jobs

    shared = tmp_path / "shared"
    shared.mkdir()
    db = shared / "cache.sqlite"
    holder = sqlite3.connect(db)  # another program's live database in the run folder
    try:
        holder.execute("PRAGMA journal_mode=WAL")
        holder.execute("CREATE TABLE t (x)")
        holder.commit()
        jobflow_cache.run_locally(
            files_jobs.poke_database(str(db), "a"), root_dir=shared, ensure_success=True
        )
        wal = os.stat(shared / "cache.sqlite-wal")
        store = CacheStore.from_settings()
        store.connect()
        try:
            (doc,) = list(store.find({}, properties=["files"]))
        finally:
            store.close()
        assert [r["path"] for r in doc["files"]] == ["result.txt"]

        holder.execute("INSERT INTO t VALUES ('held')")
        holder.commit()
        wal = os.stat(shared / "cache.sqlite-wal")
        jobflow_cache.run_locally(
            files_jobs.poke_database(str(db), "a"), root_dir=shared, ensure_success=True
        )
        after = os.stat(shared / "cache.sqlite-wal")
        assert after.st_ino == wal.st_ino, "the live WAL was not replaced"
        rows = sorted(r[0] for r in holder.execute("SELECT x FROM t"))
        # served (result.txt is as the job left it); the database keeps what it holds
        assert rows == ["a", "held"]
        assert (shared / "result.txt").read_text() == "a"
        assert holder.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        holder.close()
