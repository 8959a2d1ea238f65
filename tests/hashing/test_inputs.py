"""Files and folders named in a job's inputs count by content (issue 11, classes 1, 6, 7).

Each scenario runs a real flow under plain jobflow and under the cache, changes something
between runs, and compares every output and the executions with plain jobflow. Cross-run
scenarios run each flow in a fresh process (``python -m tests.support.input_jobs``), as a user
re-running a script does.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from jobflow import Flow, run_locally

import jobflow_cache
from jobflow_cache.hashing import contents
from tests.support import input_jobs as ij
from tests.support.jobs import my_uuid

ROOT = Path(__file__).resolve().parents[2]


def in_process(scenario: str, root: Path, variant: str, engine: str, create: bool) -> Any:
    return ij.run(scenario, str(root), variant, engine, create)


def fresh(scenario: str, root: Path, variant: str, engine: str, create: bool) -> Any:
    """Run one flow in a fresh Python process; its outputs by job name."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.input_jobs",
            scenario,
            str(root),
            variant,
            engine,
            "1" if create else "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CacheWarning" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plain(scenario: str, root: Path, variants: list[str], create: bool) -> list[Any]:
    """What plain jobflow returns for the same runs, in one folder as the cached runs."""
    return [in_process(scenario, root, v, "plain", create) for v in variants]


# -- class 1: a file an upstream job rewrites, in the default shared folder -------------------
@pytest.mark.parametrize(
    ("scenario", "engine", "create"),
    [
        ("poscar-abs", "cache", False),
        ("poscar-rel", "cache", False),  # "POSCAR": a name in the run folder, no "/"
        ("poscar-abs", "cache", True),
        ("poscar-abs", "decorated", False),
        ("poscar-rel", "decorated", False),
        ("poscar-abs", "decorated", True),
    ],
)
def test_rewritten_file_is_never_served_the_old_value(scenario, engine, create, tmp_path, counts):
    """A writes POSCAR and returns its path, B reads it. Rebuilt with another lattice, A reruns
    and rewrites POSCAR: B must rerun. The same lattice again: both are served."""
    expected = plain(scenario, tmp_path / "plain", ["1.0", "2.0", "2.0"], create)
    counts.reset()
    root = tmp_path / "cached"
    outputs = [fresh(scenario, root, v, engine, create) for v in ["1.0", "2.0"]]
    assert counts() == Counter(write_poscar=2, read_lattice=2)
    outputs.append(fresh(scenario, root, "2.0", engine, create))
    assert counts() == Counter(write_poscar=2, read_lattice=2), "an unchanged rerun is served"
    assert outputs == expected
    assert [o["read_lattice"] for o in outputs] == [1.0, 2.0, 2.0]


@pytest.mark.parametrize("engine", ["decorated", "cache"])
def test_one_job_per_process_in_one_folder(engine, tmp_path, counts):
    """FireWorks' rlaunch singleshot: every job in a process of its own, all in one folder.
    B names A's POSCAR by its absolute path; A rewrites it with another lattice: B reruns."""
    steps = [("poscar-A", "1.0"), ("poscar-B", ""), ("poscar-A", "2.0"), ("poscar-B", "")]
    steps += steps[2:]  # unchanged: both served
    expected = [in_process(s, tmp_path / "plain", v, "plain", False) for s, v in steps]
    counts.reset()
    outputs = [fresh(s, tmp_path / "cached", v, engine, False) for s, v in steps]
    assert outputs == expected
    assert [o.get("read_lattice") for o in outputs[1::2]] == [1.0, 2.0, 2.0]
    assert counts() == Counter(write_poscar=2, read_lattice=2)


# -- class 1: another job changes a file in the upstream job's folder ------------------------
@pytest.mark.parametrize(
    ("engine", "create"), [("cache", False), ("cache", True), ("decorated", True)]
)
def test_file_patched_in_upstream_folder_after_it_finished(engine, create, tmp_path, counts):
    """relax writes OUTCAR; patch_outcar changes it in relax's folder; read_outcar reads it
    (prev_dir). Rebuilt with another correction, read_outcar must read the new file."""
    expected = plain("patched", tmp_path / "plain", ["1.0", "2.0"], create)
    counts.reset()
    root = tmp_path / "cached"
    outputs = [fresh("patched", root, v, engine, create) for v in ["1.0", "2.0"]]
    assert outputs == expected
    assert outputs[1]["read_outcar"].endswith("corrected by 2.0")
    # in a shared folder relax runs again: serving it would overwrite the patched OUTCAR
    assert counts() == Counter(relax=1 if create else 2, patch_outcar=2, read_outcar=2)


def test_file_patched_by_hand_is_a_miss(tmp_path, counts):
    """A folder named by a later flow (a literal path) counts by what it holds now."""
    first = ij.relax(42.0)
    jobflow_cache.run_locally(
        Flow([first, ij.read_outcar(first.output["dir_name"])]),
        root_dir=tmp_path,
        create_folders=True,
        ensure_success=True,
    )
    folder = next(
        p for p in tmp_path.iterdir() if p.name.startswith("job_") and (p / "sub").exists()
    )

    def read(folder: Path) -> str:
        later = ij.read_outcar(str(folder))
        responses = jobflow_cache.run_locally(later, root_dir=tmp_path, create_folders=True)
        return str(responses[later.uuid][1].output)

    # a new run_locally knows no job of the earlier one: the folder counts by its path too
    assert read(folder) == f"volume={42.0 * 0.98}"
    assert counts()["read_outcar"] == 2
    assert read(folder) == f"volume={42.0 * 0.98}"
    assert counts()["read_outcar"] == 2, "the unchanged folder is served"
    (folder / "OUTCAR").write_text("volume=1.0\n")
    assert read(folder) == "volume=1.0"
    assert counts()["read_outcar"] == 3
    (folder / "sub" / "WAVECAR").unlink()  # a file the job does not read: still another tree
    assert read(folder) == "volume=1.0"
    assert counts()["read_outcar"] == 4


# -- class 7: prev_dir under jobflow's own manager --------------------------------------------
@pytest.mark.parametrize("create", [True, False])
def test_prev_dir_under_jobflows_manager_hits(create, tmp_path, counts):
    """@cached_job under jobflow.run_locally(create_folders=True): a rebuilt flow's read_outcar
    gets the new folder of relax (served there) and is served: no silent miss."""
    expected = plain("prev_dir", tmp_path / "plain", ["42.0", "42.0", "43.0"], create)
    counts.reset()
    root = tmp_path / "cached"
    outputs = [fresh("prev_dir", root, v, "decorated", create) for v in ["42.0", "42.0"]]
    assert counts() == Counter(relax=1, read_outcar=1)
    outputs.append(fresh("prev_dir", root, "43.0", "decorated", create))
    assert counts() == Counter(relax=2, read_outcar=2)
    assert outputs == expected
    if create:
        assert outputs[1]["relax"]["dir_name"].startswith("<root>/job_")


def test_prev_dir_with_the_drop_in_run_locally_hits(tmp_path, counts):
    expected = plain("prev_dir", tmp_path / "plain", ["42.0", "42.0"], True)
    counts.reset()
    outputs = [fresh("prev_dir", tmp_path / "cached", "42.0", "cache", True) for _ in range(2)]
    assert counts() == Counter(relax=1, read_outcar=1)
    assert outputs == expected


# -- folders and files outside run folders ------------------------------------------------------
def test_folder_input_counts_by_its_tree(tmp_path, counts):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha\n")
    (data / "sub" / "b.txt").write_text("beta\n")

    def summarize(folder: Any) -> Any:
        j = ij.summarize_folder(folder)
        return jobflow_cache.run_locally(j, root_dir=tmp_path / "run", ensure_success=True)[j.uuid][
            1
        ].output

    def expected() -> Any:
        j = ij.summarize_folder(str(data))
        return run_locally(j, root_dir=tmp_path / "plain", ensure_success=True)[j.uuid][1].output

    steps = [
        (lambda: None, "served: unchanged"),
        (lambda: (data / "a.txt").write_text("ALPHA\n"), "runs: same size, other bytes"),
        (lambda: (data / "empty").mkdir(), "runs: an empty folder more"),
        (lambda: (data / "sub" / "c.txt").write_text("gamma\n"), "runs: a file more"),
        (lambda: (data / "sub" / "c.txt").unlink(), "served: the tree of two steps before"),
    ]
    first = summarize(str(data))
    assert first == expected()
    for step, what in steps:
        step()
        before = counts()["summarize_folder"]
        assert summarize(str(data)) == expected()
        ran = counts()["summarize_folder"] - before - 1  # less the plain run
        assert ran == (0 if what.startswith("served") else 1), what
    before = counts()["summarize_folder"]
    assert summarize(data) == expected()  # a Path names the same folder
    assert counts()["summarize_folder"] - before == 2, "a Path is no str: its own entry"
    assert summarize(data) == expected()
    assert counts()["summarize_folder"] - before == 3


def test_path_object_and_symlinks(tmp_path, counts):
    target = tmp_path / "POSCAR"
    target.write_text("Si 1\n")
    link = tmp_path / "current"
    link.symlink_to(target)

    def read(path: Any) -> Any:
        j = ij.read_text(path)
        return jobflow_cache.run_locally(j, root_dir=tmp_path / "run", ensure_success=True)[j.uuid][
            1
        ].output

    assert read(link) == "Si 1\n"
    assert read(link) == "Si 1\n"
    assert counts()["read_text"] == 1
    target.write_text("Si 2\n")  # the link's target changed: a miss
    assert read(link) == "Si 2\n"
    assert counts()["read_text"] == 2
    assert read(Path(str(target))) == "Si 2\n"  # another path to the same bytes: its own entry
    assert counts()["read_text"] == 3


def test_large_file_is_not_read_again(tmp_path, counts, monkeypatch):
    """A large (sparse) file named by a Path: a rebuilt flow finds its digest in the memo."""
    monkeypatch.setattr(contents, "RACY_NS", 0)  # no waiting for its ctime to settle
    memo = contents.memo()
    path = tmp_path / "WAVECAR"
    with open(path, "wb") as fh:
        fh.truncate(2**30)

    def size(path: Path) -> Any:
        j = ij.size_of(path)
        return jobflow_cache.run_locally(j, root_dir=tmp_path / "run", ensure_success=True)[j.uuid][
            1
        ].output

    read_before = memo.stats["bytes_read"]
    assert size(path) == 2**30
    assert memo.stats["bytes_read"] - read_before == 2**30
    hits = memo.stats["hits"]
    assert size(path) == 2**30
    assert memo.stats["bytes_read"] - read_before == 2**30, "not read a second time"
    assert memo.stats["hits"] == hits + 1
    assert counts()["size_of"] == 1


@pytest.mark.warnings_logged
def test_folder_past_the_walk_bound_runs_uncached_with_one_warning(
    tmp_path, counts, monkeypatch, caplog
):
    monkeypatch.setattr(contents, "MAX_TREE_FILES", 5)
    data = tmp_path / "many"
    data.mkdir()
    for i in range(10):
        (data / f"f{i}.txt").write_text(str(i))
    caplog.set_level(logging.ERROR, logger="jobflow_cache.errors")
    for _ in range(2):
        j = ij.summarize_folder(str(data))
        out = jobflow_cache.run_locally(j, root_dir=tmp_path / "run", ensure_success=True)
        assert len(out[j.uuid][1].output) == 11
    warnings = [r.getMessage() for r in caplog.records if getattr(r, "jfc_swallowed_warning", 0)]
    assert len(warnings) == 2, warnings  # one per run
    assert all(str(data) in w and "uncached" in w for w in warnings)
    assert counts()["summarize_folder"] == 2


# -- class 6: twin upstream jobs keep their own uuids and folders -----------------------------
def test_twins_keep_their_own_uuids_and_folders(tmp_path, counts):
    def twins_flow() -> tuple[Flow, list[Any]]:
        d1, d2, u1, u2 = ij.own_folder(), ij.own_folder(), my_uuid(), my_uuid()
        by_dir = ij.pair(d1.output, d2.output)
        by_uuid = ij.pair(u1.output["uuid"], u2.output["uuid"])
        return Flow([d1, d2, u1, u2, by_dir, by_uuid]), [d1, d2, u1, u2, by_dir, by_uuid]

    for run in range(2):
        flow, (d1, d2, u1, u2, by_dir, by_uuid) = twins_flow()
        out = jobflow_cache.run_locally(
            flow, root_dir=tmp_path, create_folders=True, ensure_success=True
        )
        folders = [out[j.uuid][1].output for j in (d1, d2)]
        assert folders[0] != folders[1]
        assert out[by_dir.uuid][1].output == folders
        assert out[by_uuid.uuid][1].output == [u1.uuid, u2.uuid]
        assert all(Path(f, "marker").read_text() == "here\n" for f in folders)
        if run == 1:
            assert counts()["pair"] == 2, "the second flow is served"


def test_the_run_folder_named_as_dot_counts_by_its_tree(tmp_path, counts, monkeypatch):
    """ "." names the shared run folder itself (no listing holds the name): a job that lists it
    must run again when a file was added there, as under plain jobflow."""
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    (shared / "data" / "a.txt").write_text("alpha\n")
    monkeypatch.chdir(shared)

    def summarize() -> Any:
        j = ij.summarize_folder(".")
        return jobflow_cache.run_locally(j, ensure_success=True)[j.uuid][1].output

    def expected() -> Any:
        j = ij.summarize_folder(".")
        return run_locally(j, ensure_success=True)[j.uuid][1].output

    assert summarize() == expected()
    assert summarize() == expected()
    assert counts()["summarize_folder"] == 3, "unchanged: served (plain jobflow ran twice)"
    (shared / "data" / "b.txt").write_text("beta\n")
    assert summarize() == expected()
    assert counts()["summarize_folder"] == 5, "a file more in '.': the job runs again"


def test_dict_keys_naming_files_count_by_content(tmp_path, counts):
    """A path given as a dict key ({path: role}) counts by content like a value: editing the
    file makes the job run again; an unchanged file is served."""
    data = tmp_path / "POTCAR"
    data.write_text("PAW_PBE Si\n")

    def both() -> tuple[Any, Any]:
        j = ij.read_keyed({str(data): "potcar"})
        got = jobflow_cache.run_locally(j, ensure_success=True)[j.uuid][1].output
        k = ij.read_keyed({str(data): "potcar"})
        return got, run_locally(k, ensure_success=True)[k.uuid][1].output

    got, want = both()
    assert got == want == {str(data): "PAW_PBE Si\n"}
    got, want = both()
    assert got == want
    assert counts()["read_keyed"] == 3, "unchanged: served"
    data.write_text("PAW_PBE Ge\n")
    got, want = both()
    assert got == want == {str(data): "PAW_PBE Ge\n"}
    assert counts()["read_keyed"] == 5, "edited file named by a key: the job runs"
