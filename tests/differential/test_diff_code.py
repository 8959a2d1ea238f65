"""Issue 11, class 2: user code is part of what a job computes.

The user's own modules (on PYTHONPATH, not installed) and ``__main__`` scripts are written into
the world's ``code/`` folder and edited between the two runs. An edit the job's result depends
on must rerun it; an unrelated edit elsewhere must still be served.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.differential.harness import (
    LOCAL,
    VARIANTS,
    Scenario,
    World,
    cases,
    check_scenario,
    write,
)

MODULE = '''"""A user's own module (not an installed package)."""
from tests.differential.jobs import executed, task

import helpers
from helpers import scale

FACTOR = {factor}


def unrelated():
    return "{unrelated}"


@task
def energy(x):
    executed("energy")
    return {body}


def program(step, run):
    run(energy(3))
'''

HELPERS = '''"""Helpers in another user module."""


def scale(x):
    return x * {factor}
'''

MAKER = '''"""A user's Maker whose make() calls a helper method."""
from dataclasses import dataclass

from jobflow import Maker

from tests.differential.jobs import executed, task


@dataclass
class MyMaker(Maker):
    name: str = "mymaker"

    def helper(self, x):
        return x * {factor}

    @task
    def make(self, x):
        executed(self.name)
        return self.helper(x)


def program(step, run):
    run(MyMaker().make(3))
'''

USERFUNCS = '''"""A function the user passes as an argument."""


def transform(x):
    return x + {offset}
'''

SCRIPT = '''"""A user's script, run as __main__."""
from tests.differential.harness import step_main
from tests.differential.jobs import ScaleMaker, apply, executed, task

FACTOR = {factor}


def helper(x):
    return x * {helper_factor}


def unrelated():
    return "{unrelated}"


def transform(x):
    return x - {offset}


class MyScale(ScaleMaker):
    """Inherits make() from the library; overrides its helper."""

    def helper(self, x):
        return x * {maker_factor}


@task
def energy(x):
    executed("energy")
    return helper(x) * FACTOR


def program(step, run):
    if "{kind}" == "energy":
        run(energy(3))
    elif "{kind}" == "apply":
        run(apply(transform, 10))
    else:
        run(MyScale().make(3))


if __name__ == "__main__":
    step_main(program)
'''

DEFAULTS = {
    "factor": 2,
    "unrelated": "a",
    "body": "x * 2",
    "helper_factor": 2,
    "offset": 1,
    "maker_factor": 5,
}


def _module(**changes: object) -> tuple:
    """setup/between hooks writing code/usermod.py (and helpers.py) from MODULE."""

    def setup(world: World) -> None:
        write(world.code / "usermod.py", MODULE.format(**DEFAULTS))
        write(world.code / "helpers.py", HELPERS.format(**DEFAULTS))

    def between(world: World, step: int) -> None:
        values = {**DEFAULTS, **changes}
        write(world.code / "usermod.py", MODULE.format(**values))
        write(world.code / "helpers.py", HELPERS.format(**values))

    return setup, between


def _maker(world: World) -> None:
    write(world.code / "usermaker.py", MAKER.format(factor=2))


def _maker_edit(world: World, step: int) -> None:
    write(world.code / "usermaker.py", MAKER.format(factor=3))


def _funcs(world: World) -> None:
    write(world.code / "userfuncs.py", USERFUNCS.format(offset=1))


def _funcs_edit(world: World, step: int) -> None:
    write(world.code / "userfuncs.py", USERFUNCS.format(offset=2))


def _script(kind: str, name: str = "script.py", **changes: object) -> tuple:
    def setup(world: World) -> None:
        write(world.code / name, SCRIPT.format(kind=kind, **DEFAULTS))

    def between(world: World, step: int) -> None:
        write(world.code / name, SCRIPT.format(kind=kind, **{**DEFAULTS, **changes}))

    return setup, between


def _two_scripts(world: World) -> None:
    """Two scripts, each with its own MyScale(ScaleMaker) override; run 1 runs script1."""
    write(world.code / "script1.py", SCRIPT.format(kind="maker", **DEFAULTS))
    write(world.code / "script2.py", SCRIPT.format(kind="maker", **{**DEFAULTS, "maker_factor": 7}))


#: code does not depend on folders: one shared-folder and one folder-per-job variant, each
#: through one manager (the first scenario runs all four)
CODE_VARIANTS = ("shared-local", "folders-deco")


def _scenario(program: str, hooks: tuple, doc: str, **kwargs: object) -> Scenario:
    setup, between = hooks
    kwargs.setdefault("variants", CODE_VARIANTS)
    return Scenario(program, doc, setup=setup, between=between, **kwargs)  # type: ignore[arg-type]


SCENARIOS = {
    "module_function_fixed": _scenario(
        "usermod:program",
        _module(body="x * 3"),
        "the job function in the user's module is fixed",
        ran={2: ["energy"]},
        variants=VARIANTS,
    ),
    "module_constant_edited": _scenario(
        "usermod:program",
        _module(body="x * FACTOR", factor=3),
        "a module-level constant the job uses is edited",
        ran={2: ["energy"]},
    ),
    "helper_module_edited": _scenario(
        "usermod:program",
        _module(body="helpers.scale(x)", factor=3),
        "a helper in another user module is edited",
        ran={2: ["energy"]},
    ),
    "imported_helper_edited": _scenario(
        "usermod:program",
        _module(body="scale(x)", factor=3),
        "a helper imported by name (from helpers import scale) is edited",
        ran={2: ["energy"]},
    ),
    "module_unrelated_edit": _scenario(
        "usermod:program",
        _module(unrelated="b"),
        "an unrelated function of the module is edited: the job must still be served",
        served={2: ["energy"]},
    ),
    "maker_helper_edited": Scenario(
        "usermaker:program",
        "a user Maker's helper method (called by its make) is edited",
        setup=_maker,
        between=_maker_edit,
        ran={2: ["mymaker"]},
        variants=CODE_VARIANTS,
    ),
    "function_argument_edited": Scenario(
        "tests.differential.programs:function_argument_module",
        "a user-module function passed as an argument is edited",
        setup=_funcs,
        between=_funcs_edit,
        variants=LOCAL,
        ran={2: ["apply"]},
    ),
    "script_helper_edited": _scenario(
        "__main__:program",
        _script("energy", helper_factor=3),
        "a __main__ script's helper function is edited",
        script="code/script.py",
        ran={2: ["energy"]},
    ),
    "script_constant_edited": _scenario(
        "__main__:program",
        _script("energy", factor=3),
        "a __main__ script's module-level constant is edited",
        script="code/script.py",
        ran={2: ["energy"]},
    ),
    "script_unrelated_edit": _scenario(
        "__main__:program",
        _script("energy", unrelated="b"),
        "an unrelated function of the script is edited: the job must still be served",
        script="code/script.py",
        served={2: ["energy"]},
    ),
    "script_function_argument": _scenario(
        "__main__:program",
        _script("apply", offset=2),
        "a script function passed as an argument is edited",
        script="code/script.py",
        ran={2: ["apply"]},
    ),
    "main_maker_subclass": Scenario(
        "__main__:program",
        "two scripts, each with a __main__ Maker subclass overriding a helper of a library "
        "Maker whose make() it inherits",
        setup=_two_scripts,
        script="code/script{step}.py",
        ran={2: ["scale"]},
        variants=("shared-local", "folders-local", "shared-deco"),
    ),
}


@pytest.mark.parametrize(("name", "variant"), cases(SCENARIOS))
def test_code(name: str, variant: str, tmp_path: Path) -> None:
    check_scenario(SCENARIOS[name], variant, tmp_path)
