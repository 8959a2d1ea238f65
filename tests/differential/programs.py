"""Scenario programs: ``program(step, run)`` builds a flow afresh for ``step`` and runs it.

``run`` is a :class:`tests.differential.harness.Runner`; what changes between steps is either
an input chosen from ``step`` here, or something the scenario changes between the processes
(files, code, settings, cachetool).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobflow import Flow

from tests.differential import jobs as j

if TYPE_CHECKING:
    from tests.differential.harness import Runner


# -- 1. files named by inputs ---------------------------------------------------------------------
def poscar_path(step: int, run: Runner) -> None:
    """A writes POSCAR (lattice changes in step 2) and returns its path; B reads it."""
    a = j.write_poscar(3.5 + 0.25 * step)
    b = j.read_poscar(a.output)
    run(Flow([a, b]))


def poscar_relative(step: int, run: Runner) -> None:
    """B reads the bare name 'POSCAR' in the shared folder; A's output is the same string."""
    a = j.write_poscar(3.5 + 0.25 * step, relative=True)
    b = j.read_poscar("POSCAR", after=a.output)
    run(Flow([a, b]))


def poscar_in_document(step: int, run: Runner) -> None:
    """The path is nested in an upstream output document (atomate2 passes whole documents)."""
    a = j.write_poscar_doc(3.5 + 0.25 * step)
    b = j.read_poscar_doc(a.output)
    run(Flow([a, b]))


def poscar_unchanged(step: int, run: Runner) -> None:
    """Nothing changes: B reads the POSCAR A wrote (served when nothing disagrees)."""
    a = j.write_poscar(3.75)
    b = j.read_poscar(a.output)
    run(Flow([a, b]))


def patched_prev_dir(step: int, run: Runner) -> None:
    """A writes OUTCAR; P patches it (its patch changes in step 2); B reads A's folder."""
    a = j.write_outcar(-1.5)
    p = j.patch_outcar(a.output["dir_name"], f"correction = {step}")
    b = j.read_outcar(a.output["dir_name"], after=p.output)
    run(Flow([a, p, b]))


def prev_dir_rewritten(step: int, run: Runner) -> None:
    """relax -> static through prev_dir; relax's input changes in step 2."""
    a = j.write_outcar(-1.0 - step)
    b = j.read_outcar(a.output["dir_name"])
    run(Flow([a, b]))


def user_file(step: int, run: Runner) -> None:
    """A user's input file outside the run folders, named by an absolute path."""
    run(j.read_file(str(j.data_dir() / "params.txt")))


def user_file_path_object(step: int, run: Runner) -> None:
    run(j.read_file(j.data_dir() / "params.txt"))


def user_folder(step: int, run: Runner) -> None:
    """A user's input folder (edited, or given a new file, between the runs)."""
    run(j.read_folder(str(j.data_dir() / "inputs")))


def user_file_relative(step: int, run: Runner) -> None:
    """An input file named relative to the run folder (the shared folder)."""
    run(j.read_file("INCAR"))


# -- 4. provenance --------------------------------------------------------------------------------
def relax_static(step: int, run: Runner) -> None:
    relax = j.relax(2.0)
    static = j.static(relax.output["dir_name"])
    run(Flow([relax, static]))


def relax_static_dos(step: int, run: Runner) -> None:
    relax = j.relax(2.0)
    static = j.static(relax.output["dir_name"])
    dos = j.dos(static.output["dir_name"])
    run(Flow([relax, static, dos]))


# -- 5. serving must not damage ------------------------------------------------------------------
def energies(step: int, run: Runner) -> None:
    """Three jobs append to energies.csv; the middle one's input changes in step 2."""
    first = j.append_energy("first", 1.0)
    second = j.append_energy("second", 2.0 + step)
    third = j.append_energy("third", 3.0)
    run(Flow([first, second, third]))


def energies_same(step: int, run: Runner) -> None:
    """The same three appends, rebuilt unchanged: the file must grow as in plain jobflow."""
    first = j.append_energy("first", 1.0)
    second = j.append_energy("second", 2.0)
    run(Flow([first, second]))


def wavecar(step: int, run: Runner) -> None:
    """make WAVECAR, delete it, then a job (input changes in step 2) checks it is gone."""
    make = j.make_wavecar(7)
    delete = j.delete_wavecar(make.output)
    check = j.check_wavecar(delete.output, f"run {step}")
    run(Flow([make, delete, check]))


def wavecar_same(step: int, run: Runner) -> None:
    make = j.make_wavecar(7)
    delete = j.delete_wavecar(make.output)
    run(Flow([make, delete]))


def tree(step: int, run: Runner) -> None:
    run(j.make_tree(5))


def append_to_served(step: int, run: Runner) -> None:
    """A served job's file is appended to by a job that runs every time."""
    log = j.write_log(1)
    append = j.append_log(log.output["file"], f"appended in run {step}")
    run(Flow([log, append]))


def big_files(step: int, run: Runner) -> None:
    """B reads A's files through prev_dir (A's big file may be left out of the cache)."""
    a = j.write_big(3)
    b = j.read_big(a.output["dir_name"])
    run(Flow([a, b]))


def big_files_changed(step: int, run: Runner) -> None:
    a = j.write_big(3)
    b = j.read_big(a.output["dir_name"])
    run(Flow([a, b]))


def served_paths(step: int, run: Runner) -> None:
    a = j.own_file(4)
    b = j.read_file(a.output["path"])
    run(Flow([a, b]))


def modes(step: int, run: Runner) -> None:
    run(j.write_modes(1))


def live_database(step: int, run: Runner) -> None:
    """Another process writes a live SQLite database (WAL) in the shared folder meanwhile."""
    db = run.run_dir / "other.sqlite"
    stop = run.run_dir.parent / f"stop{step}"
    code = (
        "import sys; from tests.differential.jobs import db_writer; "
        "db_writer(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
    )
    writer = subprocess.Popen([sys.executable, "-c", code, str(db), str(stop), str(step)])
    try:
        deadline = time.monotonic() + 60
        while not Path(str(stop) + ".started").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        run(j.slow_work(5))
    finally:
        Path(stop).write_text("")
        writer.wait(timeout=60)


# -- 6. bookkeeping -------------------------------------------------------------------------------
def huge_output(step: int, run: Runner) -> None:
    a = j.huge(1)
    b = j.add(5, 6)
    run(Flow([a, b]))


def exposed_store(step: int, run: Runner) -> None:
    """Step 2 first runs another flow into the same JobStore: the exposed job sees it."""
    if step == 2:
        run(j.add(1, 2))
    run(j.count_docs(1))


def twins(step: int, run: Runner) -> None:
    """Two identical upstream jobs (twins) feed one downstream job."""
    first, second = j.who_am_i(1), j.who_am_i(1)
    both = j.collect(first.output, second.output)
    run(Flow([first, second, both]))


def hit_types(step: int, run: Runner) -> None:
    run(j.typed_values(1.5))


def settings_file(step: int, run: Runner) -> None:
    a = j.add(1, 2)
    b = j.add(a.output, 3)
    run(Flow([a, b]))


def blob_and_replace(step: int, run: Runner) -> None:
    blob = j.with_blob(3)
    dyn = j.make_replace(3)
    run(Flow([blob, dyn]))


def cache_object_reused(step: int, run: Runner) -> None:
    """One Cache object, given first to a create_folders run, then to a shared-folder run."""
    run(j.add(1, 1), create_folders=True, cache_object=True)
    a = j.write_poscar(3.5 + 0.25 * step)
    b = j.read_poscar(a.output)
    run(Flow([a, b]), create_folders=False, cache_object=True)


# -- 7. silent misses -----------------------------------------------------------------------------
def prev_dir_and_uuid(step: int, run: Runner) -> None:
    """A prev_dir input and an upstream uuid as a plain string: a rebuilt flow is served."""
    a = j.produce(1)
    b = j.consume(a.output["dir_name"], a.output["uuid"])
    run(Flow([a, b]))


def prev_dir_chain(step: int, run: Runner) -> None:
    relax = j.relax(1.0)
    static = j.static(relax.output["dir_name"])
    dos = j.dos(static.output["dir_name"])
    run(Flow([relax, static, dos]))


# -- 3. values ------------------------------------------------------------------------------------
def tuple_vs_list(step: int, run: Runner) -> None:
    run(j.pick((0, 1) if step == 1 else [0, 1]))


def float32_vs_float(step: int, run: Runner) -> None:
    import numpy as np

    x = np.float32(0.1)
    run(j.third(x if step == 1 else float(x)))


def zone_vs_offset(step: int, run: Runner) -> None:
    from zoneinfo import ZoneInfo

    zone = ZoneInfo("Europe/Paris") if step == 1 else dt.timezone(dt.timedelta(hours=1))
    run(j.later(dt.datetime(2024, 1, 15, 12, 0, tzinfo=zone)))


def int_vs_float(step: int, run: Runner) -> None:
    run(j.describe(2 if step == 1 else 2.0))


def bool_vs_int(step: int, run: Runner) -> None:
    run(j.describe(True if step == 1 else 1))


def int64_vs_int(step: int, run: Runner) -> None:
    import numpy as np

    run(j.describe(np.int64(5) if step == 1 else 5))


def enum_vs_str(step: int, run: Runner) -> None:
    run(j.describe(j.Mode.FAST if step == 1 else "fast"))


def str_subclass(step: int, run: Runner) -> None:
    import numpy as np

    run(j.describe(np.str_("fast") if step == 1 else "fast"))


def negative_zero(step: int, run: Runner) -> None:
    run(j.sign(0.0 if step == 1 else -0.0))


def array_dtype(step: int, run: Runner) -> None:
    import numpy as np

    run(j.scale_array(np.array([1, 3], dtype=np.int64 if step == 1 else np.int32)))


# -- 2. user code ---------------------------------------------------------------------------------
def function_argument_module(step: int, run: Runner) -> None:
    """A user-module function (edited between the runs) passed as an argument."""
    import userfuncs  # type: ignore[import-not-found]  # written into the world's code/

    run(j.apply(userfuncs.transform, 10))


def run_env_world() -> str:
    return os.environ.get("JFC_DIFF_DATA", "")


# -- atomate2 (EMT) -------------------------------------------------------------------------------
def _copper() -> Any:
    from pymatgen.core import Lattice, Structure

    fcc = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
    return Structure(Lattice.cubic(3.62), ["Cu"] * 4, fcc).get_primitive_structure()


def a2_relax_static(step: int, run: Runner) -> None:
    """EMT relax -> fixed-cell 'static' with prev_dir; relax's fmax changes in step 2."""
    from atomate2.ase.jobs import EmtRelaxMaker

    relax = EmtRelaxMaker(relax_kwargs={"fmax": 0.05 if step == 1 else 0.001}).make(_copper())
    static = EmtRelaxMaker(name="EMT static", steps=1, relax_cell=False).make(
        relax.output.structure, prev_dir=relax.output.dir_name
    )
    run(Flow([relax, static]))


def a2_unchanged(step: int, run: Runner) -> None:
    from atomate2.ase.jobs import EmtRelaxMaker

    relax = EmtRelaxMaker(relax_kwargs={"fmax": 0.01}).make(_copper())
    static = EmtRelaxMaker(name="EMT static", steps=1, relax_cell=False).make(
        relax.output.structure, prev_dir=relax.output.dir_name
    )
    run(Flow([relax, static]))


def a2_static_field(step: int, run: Runner) -> None:
    """Only the static Maker's field changes: relax served, static recomputed."""
    from atomate2.ase.jobs import EmtRelaxMaker

    relax = EmtRelaxMaker(relax_kwargs={"fmax": 0.01}).make(_copper())
    static = EmtRelaxMaker(name="EMT static", steps=1 if step == 1 else 3, relax_cell=False).make(
        relax.output.structure, prev_dir=relax.output.dir_name
    )
    run(Flow([relax, static]))


# -- the harness's own check -------------------------------------------------------------------
def hidden_input(step: int, run: Runner) -> None:
    run(j.read_knob(2))


# -- more attacks ------------------------------------------------------------------------------
def same_content_other_path(step: int, run: Runner) -> None:
    """Run 2 names another file with the same bytes: the result names the file."""
    run(j.read_named(str(j.data_dir() / ("a.txt" if step == 1 else "b.txt"))))


def same_tree_other_folder(step: int, run: Runner) -> None:
    run(j.list_folder(str(j.data_dir() / ("set1" if step == 1 else "set2"))))


def user_symlink(step: int, run: Runner) -> None:
    run(j.read_file(str(j.data_dir() / "current.txt")))


def env_knob(step: int, run: Runner) -> None:
    run(j.read_env_knob(1))


def parent_relative_file(step: int, run: Runner) -> None:
    """An input named relative to the job's own folder: '../params.txt' is run/params.txt."""
    run(j.read_file("../params.txt"))
