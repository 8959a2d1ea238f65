"""Issue 11, class 4: invalidation follows provenance.

``relax`` reads the user's POTCAR without naming it in its inputs (no digest can see it), so
after fixing POTCAR the user runs the real ``cachetool invalidate <relax>`` (or ``purge``), as
the docs say. Every job that consumed relax's results (through prev_dir) must recompute.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.differential.harness import Scenario, World, cases, check_scenario, write

P = "tests.differential.programs:"


def _potcar(world: World) -> None:
    write(world.data / "POTCAR", "factor 1.0\n")


def _fix_and_invalidate(world: World, step: int) -> None:
    write(world.data / "POTCAR", "factor 1.5\n")
    if world.cached:
        world.cachetool("invalidate", world.digest_of("relax"), "--reason", "bad POTCAR")


def _fix_and_purge(world: World, step: int) -> None:
    write(world.data / "POTCAR", "factor 1.5\n")
    if world.cached:
        world.cachetool("purge", "--digest", world.digest_of("relax"), "--yes")


SCENARIOS = {
    "invalidate_relax": Scenario(
        P + "relax_static",
        "POTCAR fixed, relax invalidated with cachetool: static (prev_dir) must recompute",
        setup=_potcar,
        between=_fix_and_invalidate,
        ran={2: ["relax", "static"]},
    ),
    "invalidate_relax_transitive": Scenario(
        P + "relax_static_dos",
        "the same with a third job reading static's file: the cascade is transitive",
        setup=_potcar,
        between=_fix_and_invalidate,
        ran={2: ["relax", "static", "dos"]},
        variants=("shared-local", "folders-local", "folders-deco"),
    ),
    "purge_relax": Scenario(
        P + "relax_static",
        "POTCAR fixed, relax purged with cachetool purge --digest: static must recompute",
        setup=_potcar,
        between=_fix_and_purge,
        ran={2: ["relax", "static"]},
        variants=("shared-local", "folders-local", "folders-deco"),
    ),
}


@pytest.mark.parametrize(("name", "variant"), cases(SCENARIOS))
def test_provenance(name: str, variant: str, tmp_path: Path) -> None:
    check_scenario(SCENARIOS[name], variant, tmp_path)
