"""Issue 11, classes 6 and 7: bookkeeping, and no silent misses.

Outputs jobflow rejects, jobs that read the JobStore, settings from the YAML file, a relative
cache folder, twin upstream jobs, the Python types of a hit's responses, a Cache object reused
across runs, the environment overriding what run_locally knows; and rebuilt flows with prev_dir
and uuid inputs that must be served (counted) under both managers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.differential.harness import (
    FOLDERS,
    SHARED,
    VARIANTS,
    Scenario,
    World,
    cases,
    check_scenario,
    write,
)

P = "tests.differential.programs:"


def _disable_in_file(world: World) -> None:
    if world.cached:
        write(world.path / "config.yaml", "DISABLE: true\n")


def _nothing_cached(plain: World, cached: World) -> None:
    for result in cached.results:
        assert not result["outcomes"], f"DISABLE in the settings file, yet {result['outcomes']}"
    assert not (cached.path / "cache").exists(), "DISABLE: true, yet a cache store was opened"


def _potcar(world: World) -> None:
    write(world.data / "POTCAR", "factor 1.0\n")


def _relative_cache_used(plain: World, cached: World) -> None:
    assert (cached.path / "jfc").is_dir(), "the relative cache folder is not under the start folder"


SCENARIOS = {
    "huge_output": Scenario(
        P + "huge_output",
        "an output over 64 bits fails jobflow's store in both worlds, in both runs",
        ran={2: ["huge"]},
        failures_expected=True,
        variants=("shared-local", "shared-deco", "folders-local"),
    ),
    "expose_store": Scenario(
        P + "exposed_store",
        "an expose_store=True job counts the JobStore's documents (another flow ran first)",
        ran={2: ["count_docs"]},
        variants=("shared-local", "shared-deco", "folders-local"),
    ),
    "disable_in_settings_file": Scenario(
        P + "settings_file",
        "DISABLE: true in the settings file works like JOBFLOW_CACHE_DISABLE=1",
        setup=_disable_in_file,
        ran={1: ["add"], 2: ["add"]},
        check=_nothing_cached,
        variants=("shared-local", "shared-deco", "folders-deco"),
    ),
    "relative_cache_dir": Scenario(
        P + "settings_file",
        "JOBFLOW_CACHE_DIR=jfc (relative) with a folder per job: run 2 is served, and no "
        "job folder holds the cache",
        env={"JOBFLOW_CACHE_DIR": "jfc"},
        served={2: ["add"]},
        check=_relative_cache_used,
        variants=(*FOLDERS, "shared-local"),
    ),
    "twin_upstreams": Scenario(
        P + "twins",
        "twin upstream jobs return their uuids and folders to one downstream job",
        variants=VARIANTS,
    ),
    "hit_types": Scenario(
        P + "hit_types",
        "a hit's response holds np.float32, np.int64, Enums, a tuple, an int32 array",
        served={2: ["typed_values"]},
    ),
    "blob_and_replace": Scenario(
        P + "blob_and_replace",
        "an output in an additional store and a replace Response are served as computed",
        served={2: ["with_blob", "make_replace", "add_one"]},
        count_variants=FOLDERS,
        variants=("shared-local", *FOLDERS),
    ),
    "exclusive_dirs_env": Scenario(
        P + "poscar_path",
        "JOBFLOW_CACHE_EXCLUSIVE_DIRS=1 in the environment must not override the shared folder "
        "run_locally knows it runs in",
        env={"JOBFLOW_CACHE_EXCLUSIVE_DIRS": "1"},
        ran={2: ["read_poscar"]},
        variants=SHARED,
    ),
    "cache_object_reused": Scenario(
        P + "cache_object_reused",
        "a Cache object given to a create_folders run, then to a shared-folder run",
        ran={2: ["read_poscar"]},
        variants=("shared-local",),
    ),
    # -- 7. silent misses: a rebuilt flow must be served ------------------------------------------
    "prev_dir_and_uuid_served": Scenario(
        P + "prev_dir_and_uuid",
        "prev_dir and an upstream uuid as inputs: the rebuilt flow is served",
        served={2: ["produce", "consume"]},
        variants=FOLDERS,
    ),
    "prev_dir_chain_served": Scenario(
        P + "prev_dir_chain",
        "relax -> static -> dos through prev_dir: the rebuilt flow is served",
        setup=_potcar,
        served={2: ["relax", "static", "dos"]},
        variants=FOLDERS,
    ),
}


@pytest.mark.parametrize(("name", "variant"), cases(SCENARIOS))
def test_bookkeeping(name: str, variant: str, tmp_path: Path) -> None:
    check_scenario(SCENARIOS[name], variant, tmp_path)
