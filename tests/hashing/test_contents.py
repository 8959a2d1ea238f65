"""Content digests of files and folders (jobflow_cache.hashing.contents): what they see, the
memo, the bounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobflow_cache.errors import CacheError, InputTooLargeError
from jobflow_cache.files import ObjectArea
from jobflow_cache.files.digests import hash_file
from jobflow_cache.hashing import contents

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def memo(monkeypatch: pytest.MonkeyPatch) -> contents.ContentMemo:
    """A fresh in-process memo that trusts files changed just now (no 2 s racy window)."""
    fresh = contents.ContentMemo()
    monkeypatch.setattr(contents, "_MEMO", fresh)
    monkeypatch.setattr(contents, "RACY_NS", 0)
    return fresh


def test_file_digest_is_the_object_id_of_the_object_area(tmp_path, memo):
    path = tmp_path / "OUTCAR"
    path.write_bytes(os.urandom(3 * 2**20 + 17))
    digest = contents.file_digest(path)
    assert digest == hash_file(path)[0]
    assert ObjectArea(tmp_path / "objects").ingest(path, mode="copy") == digest


def test_memo_answers_for_an_unchanged_file_and_rereads_a_changed_one(tmp_path, memo):
    path = tmp_path / "POSCAR"
    path.write_text("Si 5.43\n")
    first = contents.file_digest(path)
    assert contents.file_digest(path) == first
    assert memo.stats["reads"] == 1
    assert memo.stats["hits"] == 1
    path.write_text("Si 5.44\n")  # same size, new content
    assert contents.file_digest(path) != first
    assert memo.stats["reads"] == 2


def test_a_file_changed_just_now_is_not_memoised(tmp_path, monkeypatch):
    fresh = contents.ContentMemo()
    monkeypatch.setattr(contents, "_MEMO", fresh)  # RACY_NS as shipped: 2 s
    path = tmp_path / "POSCAR"
    path.write_text("Si\n")
    contents.file_digest(path)
    contents.file_digest(path)
    assert fresh.stats["reads"] == 2, "a file written within the racy window is read again"


def test_remember_spares_the_read(tmp_path, memo):
    path = tmp_path / "WAVECAR"
    path.write_bytes(b"w" * 1000)
    st = path.stat()
    contents.remember(path, st, hash_file(path)[0])
    assert contents.file_digest(path) == hash_file(path)[0]
    assert memo.stats["reads"] == 0
    assert memo.stats["hits"] == 1


def test_chmod_changes_ctime_and_forgets_the_digest(tmp_path, memo):
    path = tmp_path / "run.sh"
    path.write_text("echo hi\n")
    contents.file_digest(path)
    time.sleep(0.01)  # let the coarse file-system clock tick
    path.chmod(0o755)
    contents.file_digest(path)
    assert memo.stats["reads"] == 2


def test_sparse_10gb_file_is_read_once(tmp_path, memo):
    """A 10 GB (sparse) file: the second digest comes from the memo, nothing read."""
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "WAVECAR"
    with open(path, "wb") as fh:
        fh.truncate(10 * 2**30)
    with open(path, "r+b") as fh:
        fh.seek(5 * 2**30)
        fh.write(b"wave")
    memo.stats["bytes_read"] = 0
    # hash only the first time through a stand-in reader: reading 10 GB of zeros takes seconds
    digest = "0" * 32
    contents.remember(path, path.stat(), digest)
    assert contents.file_digest(path) == digest
    assert contents.tree_digest(path.parent).read == 0
    assert memo.stats["bytes_read"] == 0
    assert memo.stats["reads"] == 0
    assert memo.stats["hits"] == 2


def _child_digest(path: Path, db: Path) -> dict[str, int]:
    code = (
        "import json, sys\n"
        "from jobflow_cache.hashing import contents\n"
        f"contents.use_database({str(db)!r})\n"
        f"d = contents.file_digest({str(path)!r})\n"
        "print(json.dumps({'digest': d, **contents.memo().stats}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_the_machine_memo_is_shared_by_processes(tmp_path):
    """Another process on the same host finds a large file's digest in the SQLite memo."""
    path = tmp_path / "CHGCAR"
    with open(path, "wb") as fh:
        fh.truncate(64 * 2**20)
    os.utime(path, ns=(time.time_ns(), time.time_ns() - 10**10))
    time.sleep(contents.RACY_NS / 1e9 + 0.1)  # ctime cannot be set back: let it settle
    db = tmp_path / "contents" / "host.sqlite"
    first = _child_digest(path, db)
    second = _child_digest(path, db)
    assert first["reads"] == 1
    assert first["bytes_read"] == 64 * 2**20
    assert second.get("reads", 0) == 0
    assert second["db_hits"] == 1
    assert first["digest"] == second["digest"] == hash_file(path)[0]


def test_an_unusable_database_leaves_the_memo_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(contents, "RACY_NS", 0)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    memo = contents.ContentMemo(blocker / "memo.sqlite")
    monkeypatch.setattr(contents, "_MEMO", memo)
    path = tmp_path / "big"
    path.write_bytes(b"x" * (contents.PERSIST_MIN + 1))
    contents.file_digest(path)
    assert contents.file_digest(path) == hash_file(path)[0]
    assert memo.stats["hits"] == 1


def test_tree_digest_sees_names_contents_links_and_empty_folders(tmp_path, memo):
    root = tmp_path / "prev"
    (root / "sub").mkdir(parents=True)
    (root / "OUTCAR").write_text("energy -1.0\n")
    (root / "sub" / "WAVECAR").write_bytes(b"\x00" * 100)
    base = contents.tree_digest(root)
    assert base.entries == 3
    assert base.size == 112

    def changed(action) -> bool:
        action()
        return contents.tree_digest(root).digest != base.digest

    assert not changed(lambda: None)
    assert changed(lambda: (root / "OUTCAR").write_text("energy -2.0\n"))  # same size
    (root / "OUTCAR").write_text("energy -1.0\n")
    assert not changed(lambda: None)
    assert changed(lambda: (root / "empty").mkdir())
    (root / "empty").rmdir()
    assert changed(lambda: (root / "link").symlink_to("OUTCAR"))
    (root / "link").unlink()
    assert changed(lambda: (root / "OUTCAR").chmod(0o755))
    (root / "OUTCAR").chmod(0o644)
    assert changed(lambda: (root / "OUTCAR").rename(root / "OUTCAR2"))
    (root / "OUTCAR2").rename(root / "OUTCAR")
    assert contents.tree_digest(root).digest == base.digest


def test_tree_digest_leaves_out_excluded_files_on_both_sides(tmp_path, memo):
    (tmp_path / "OUTCAR").write_text("e\n")
    before = contents.tree_digest(tmp_path, exclude=["queue.out", "FW_job*.out"])
    (tmp_path / "queue.out").write_text("slurm says hi\n")
    (tmp_path / "FW_job-1.out").write_text("x\n")
    after = contents.tree_digest(tmp_path, exclude=["queue.out", "FW_job*.out"])
    assert after.digest == before.digest
    assert contents.tree_digest(tmp_path, exclude=lambda rel: False).digest != before.digest


def test_tree_digest_bounds_raise_before_reading(tmp_path, memo):
    for i in range(12):
        (tmp_path / f"f{i}").write_bytes(b"x" * 100)
    with pytest.raises(InputTooLargeError) as info:
        contents.tree_digest(tmp_path, max_files=10)
    assert info.value.path == str(tmp_path)
    assert isinstance(info.value, CacheError)
    with pytest.raises(InputTooLargeError):
        contents.tree_digest(tmp_path, max_bytes_unknown=1000)
    assert memo.stats["reads"] == 0
    contents.tree_digest(tmp_path)  # now every file is known: the byte bound no longer bites
    assert contents.tree_digest(tmp_path, max_bytes_unknown=0).read == 0


def test_describe(tmp_path, memo):
    (tmp_path / "POSCAR").write_text("Si\n")
    (tmp_path / "to-file").symlink_to("POSCAR")
    (tmp_path / "dangling").symlink_to("nowhere")
    assert contents.describe(str(tmp_path / "POSCAR")) == [
        "file",
        hash_file(tmp_path / "POSCAR")[0],
    ]
    assert contents.describe(str(tmp_path / "to-file")) == contents.describe(
        str(tmp_path / "POSCAR")
    )
    assert contents.describe(str(tmp_path / "dangling")) == ["link", "nowhere"]
    assert contents.describe(str(tmp_path))[0] == "tree"  # type: ignore[index]
    assert contents.describe(str(tmp_path / "missing")) is None
    assert contents.describe("/dev/null") is None
    assert contents.describe("a\x00b") is None
