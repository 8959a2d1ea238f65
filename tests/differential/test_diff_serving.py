"""Issue 11, class 5: serving a hit never destroys or hides work.

Shared folders that several jobs write, files a job deleted, symlinks and empty folders, files
appended to after a hit, files the cache left out, and another process's live database: after
every run the cache world's folders must hold exactly what plain jobflow's hold.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.differential.harness import (
    FOLDERS,
    SHARED,
    Scenario,
    World,
    cases,
    check_scenario,
    remove_job_folders,
)

P = "tests.differential.programs:"


def _remove_folders(world: World, step: int) -> None:
    remove_job_folders(world, step)


def _database_intact(plain: World, cached: World) -> None:
    """The other program's database: sound, and every row it wrote in both runs is there."""
    for world in (plain, cached):
        con = sqlite3.connect(world.run_dir / "other.sqlite")
        try:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok", world.kind
            rows = con.execute("SELECT n, step FROM rows ORDER BY n").fetchall()
        finally:
            con.close()
        numbers = [n for n, _ in rows]
        assert numbers == list(range(1, len(rows) + 1)), f"{world.kind}: rows lost"
        assert {s for _, s in rows} == {1, 2}, f"{world.kind}: a run's rows are missing"


SCENARIOS = {
    "energies_csv": Scenario(
        P + "energies",
        "three jobs append to energies.csv in the shared folder; the second's input changes",
        variants=SHARED,
    ),
    "energies_csv_unchanged": Scenario(
        P + "energies_same",
        "two jobs append to energies.csv; rebuilt unchanged, the file grows as in jobflow",
        variants=SHARED,
    ),
    "wavecar_deleted": Scenario(
        P + "wavecar",
        "a job deletes WAVECAR; a later job (input changed) must not find it",
        variants=SHARED,
        ran={2: ["check_wavecar"]},
    ),
    "wavecar_deleted_unchanged": Scenario(
        P + "wavecar_same",
        "a job deletes WAVECAR; rebuilt unchanged, WAVECAR must be gone at the end",
        variants=SHARED,
    ),
    "symlinks_and_empty_folders": Scenario(
        P + "tree",
        "a job leaves a symlink, a dangling symlink and empty folders",
        served={2: ["make_tree"]},
        count_variants=FOLDERS,
    ),
    "append_to_served_file": Scenario(
        P + "append_to_served",
        "a job appends to a served job's file; run 1's folder and the cache must not change, "
        "and a third run is still right",
        steps=3,
        served={2: ["write_log"], 3: ["write_log"]},
        ran={2: ["append_log"], 3: ["append_log"]},
        count_variants=FOLDERS,
    ),
    "max_file_size": Scenario(
        P + "big_files",
        "MAX_FILE_SIZE leaves A's 4 kB file out of the cache; B reads it through prev_dir",
        env={"JOBFLOW_CACHE_MAX_FILE_SIZE": "1000"},
        variants=("shared-local", *FOLDERS),
    ),
    "max_file_size_folder_gone": Scenario(
        P + "big_files",
        "the same, and run 1's folders are deleted before run 2",
        env={"JOBFLOW_CACHE_MAX_FILE_SIZE": "1000"},
        between=_remove_folders,
        variants=FOLDERS,
    ),
    "files_none": Scenario(
        P + "big_files",
        "FILES=none: entries without files; B reads A's files through prev_dir",
        env={"JOBFLOW_CACHE_FILES": "none"},
        variants=("shared-local", *FOLDERS),
    ),
    "files_none_folder_gone": Scenario(
        P + "big_files",
        "FILES=none, and run 1's folders are deleted before run 2",
        env={"JOBFLOW_CACHE_FILES": "none"},
        between=_remove_folders,
        variants=FOLDERS,
    ),
    "served_output_paths": Scenario(
        P + "served_paths",
        "a job returns the path of a file it wrote; B reads it",
        served={2: ["own_file"]},
        count_variants=FOLDERS,
    ),
    "file_modes": Scenario(
        P + "modes",
        "an executable script and a private file keep their modes when served",
        served={2: ["write_modes"]},
        variants=FOLDERS,
    ),
    "live_database": Scenario(
        P + "live_database",
        "another process writes a live SQLite database (WAL) in the shared folder meanwhile",
        variants=SHARED,
        exclude=("other.sqlite*",),
        check=_database_intact,
    ),
}


@pytest.mark.parametrize(("name", "variant"), cases(SCENARIOS))
def test_serving(name: str, variant: str, tmp_path: Path) -> None:
    check_scenario(SCENARIOS[name], variant, tmp_path)
