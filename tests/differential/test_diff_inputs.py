"""Issue 11, class 1: files and folders named by inputs are part of what a job reads.

Every scenario changes a file a job reads (through an upstream's rewrite, a patch, or the
user's edit) between two runs of a rebuilt flow; the cache world must give plain jobflow's
outputs and files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.differential.harness import (
    FOLDERS,
    LOCAL,
    SHARED,
    Scenario,
    World,
    cases,
    check_scenario,
    write,
)

P = "tests.differential.programs:"


def _params(world: World) -> None:
    write(world.data / "params.txt", "alpha = 1.0\n")


def _edit_params(world: World, step: int) -> None:
    write(world.data / "params.txt", "alpha = 2.0\n")  # same size: only the bytes differ


def _edit_params_keep_mtime(world: World, step: int) -> None:
    path = world.data / "params.txt"
    before = path.stat()
    write(path, "alpha = 2.0\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _inputs(world: World) -> None:
    write(world.data / "inputs" / "a.txt", "a = 1\n")
    write(world.data / "inputs" / "sub" / "b.txt", "b = 1\n")


def _edit_inputs(world: World, step: int) -> None:
    write(world.data / "inputs" / "sub" / "b.txt", "b = 2\n")


def _add_input(world: World, step: int) -> None:
    write(world.data / "inputs" / "c.txt", "c = 3\n")


def _incar(world: World) -> None:
    write(world.run_dir / "INCAR", "ENCUT = 520\n")


def _edit_incar(world: World, step: int) -> None:
    write(world.run_dir / "INCAR", "ENCUT = 600\n")


def _twins(world: World) -> None:
    for name in ("a.txt", "b.txt"):
        write(world.data / name, "same bytes\n")
    for folder in ("set1", "set2"):
        write(world.data / folder / "x.txt", "same tree\n")


def _delete_params(world: World, step: int) -> None:
    (world.data / "params.txt").unlink()


def _linked(world: World) -> None:
    write(world.data / "v1.txt", "version 1\n")
    write(world.data / "v2.txt", "version 2\n")
    (world.data / "current.txt").symlink_to("v1.txt")


def _relink(world: World, step: int) -> None:
    (world.data / "current.txt").unlink()
    (world.data / "current.txt").symlink_to("v2.txt")


def _root_params(world: World) -> None:
    write(world.run_dir / "params.txt", "alpha = 1.0\n")


def _edit_root_params(world: World, step: int) -> None:
    write(world.run_dir / "params.txt", "alpha = 2.0\n")


SCENARIOS = {
    "poscar_path": Scenario(
        P + "poscar_path",
        "A writes POSCAR (lattice from its input, changed in run 2), returns its path; B reads it",
        ran={2: ["write_poscar", "read_poscar"]},
    ),
    "poscar_relative": Scenario(
        P + "poscar_relative",
        "B reads the relative name 'POSCAR' in the shared folder; A's output is unchanged",
        variants=SHARED,
        ran={2: ["read_poscar"]},
    ),
    "poscar_in_document": Scenario(
        P + "poscar_in_document",
        "the POSCAR path is nested in A's output document",
        ran={2: ["read_poscar_doc"]},
    ),
    "poscar_unchanged": Scenario(
        P + "poscar_unchanged",
        "nothing changes: with a folder per job both jobs are served",
        served={2: ["write_poscar", "read_poscar"]},
        count_variants=FOLDERS,
    ),
    "patched_prev_dir": Scenario(
        P + "patched_prev_dir",
        "P patches A's OUTCAR after A finished (a new patch in run 2); B reads A's folder",
        ran={2: ["patch_outcar", "read_outcar"]},
    ),
    "prev_dir_rewritten": Scenario(
        P + "prev_dir_rewritten",
        "A's input changes; B reads A's OUTCAR through prev_dir",
        ran={2: ["write_outcar", "read_outcar"]},
    ),
    "user_file": Scenario(
        P + "user_file",
        "the user edits an input file (same path, same size) between the runs",
        setup=_params,
        between=_edit_params,
        ran={2: ["read_file"]},
    ),
    "user_file_path_object": Scenario(
        P + "user_file_path_object",
        "the same, the file given as a pathlib.Path",
        setup=_params,
        between=_edit_params,
        variants=LOCAL,
        ran={2: ["read_file"]},
    ),
    "user_file_mtime_restored": Scenario(
        P + "user_file",
        "the user edits an input file and restores its mtime (os.utime): the bytes still differ",
        setup=_params,
        between=_edit_params_keep_mtime,
        variants=("shared-local",),
        ran={2: ["read_file"]},
    ),
    "user_folder_edited": Scenario(
        P + "user_folder",
        "the user edits a file deep in an input folder",
        setup=_inputs,
        between=_edit_inputs,
        ran={2: ["read_folder"]},
    ),
    "user_folder_new_file": Scenario(
        P + "user_folder",
        "the user adds a file to an input folder",
        setup=_inputs,
        between=_add_input,
        variants=("shared-local", "folders-deco"),
        ran={2: ["read_folder"]},
    ),
    "relative_input_file": Scenario(
        P + "user_file_relative",
        "an input file named relative to the shared run folder ('INCAR'), edited",
        setup=_incar,
        between=_edit_incar,
        variants=SHARED,
        ran={2: ["read_file"]},
    ),
    "same_content_other_path": Scenario(
        P + "same_content_other_path",
        "run 2 names another file with the same bytes; the job's result names its file",
        setup=_twins,
        variants=("shared-local", "folders-deco"),
        ran={2: ["read_named"]},
    ),
    "same_tree_other_folder": Scenario(
        P + "same_tree_other_folder",
        "run 2 names another folder with the same tree; the job's result names its folder",
        setup=_twins,
        variants=("shared-local", "folders-deco"),
        ran={2: ["list_folder"]},
    ),
    "input_file_deleted": Scenario(
        P + "user_file",
        "the user deletes the input file: the job must fail as in jobflow, not be served",
        failures_expected=True,
        setup=_params,
        between=_delete_params,
        variants=("shared-local", "folders-deco"),
        ran={2: ["read_file"]},
    ),
    "input_symlink_retargeted": Scenario(
        P + "user_symlink",
        "the input path is a symlink the user points at another file between the runs",
        setup=_linked,
        between=_relink,
        variants=("shared-local", "folders-deco"),
        ran={2: ["read_file"]},
    ),
    "parent_relative_file": Scenario(
        P + "parent_relative_file",
        "with a folder per job, '../params.txt' (relative to the job's folder) is edited",
        setup=_root_params,
        between=_edit_root_params,
        variants=FOLDERS,
        ran={2: ["read_file"]},
    ),
    "digest_env": Scenario(
        P + "env_knob",
        "a job reads an environment variable named in DIGEST_ENV; its value changes",
        env={"JOBFLOW_CACHE_DIGEST_ENV": "JFC_DIFF_STEP"},
        variants=("shared-local", "folders-deco"),
        ran={2: ["read_env_knob"]},
    ),
}


@pytest.mark.parametrize(("name", "variant"), cases(SCENARIOS))
def test_inputs(name: str, variant: str, tmp_path: Path) -> None:
    check_scenario(SCENARIOS[name], variant, tmp_path)
