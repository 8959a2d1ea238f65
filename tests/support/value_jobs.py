"""Jobs returning values whose Python types JSON does not keep (numpy scalars and arrays, Enums
with str/int mixins, tuples; jobflow's JobStore refuses sets): a hit must hand back the types a
computed run returns.

At module level so they import by path in any process; each counts its real executions in
``JFC_COUNTS_FILE`` (see tests/support/jobs.py).
"""

from __future__ import annotations

import enum

import numpy as np
from jobflow import job

from tests.support.jobs import executed


class Phase(str, enum.Enum):
    SOLID = "solid"


class Spin(enum.IntEnum):
    UP = 1


class Shape(enum.Enum):
    CUBE = "cube"


@job
def typed_values(x: float):
    """Return one of each type JSON would not keep."""
    executed("typed_values")
    return {
        "f32": np.float32(x),
        "f64": np.float64(x),
        "i64": np.int64(3),
        "flag": np.bool_(True),
        "array": np.arange(3, dtype=np.float32) * np.float32(x),
        "phase": Phase.SOLID,
        "spin": Spin.UP,
        "shape": Shape.CUBE,
        "pair": (1, np.int32(2)),
        Spin.UP: "int-mixin key",
    }


@job
def scalar_f32(x: float):
    """Return a bare numpy scalar (the whole output is the scalar)."""
    executed("scalar_f32")
    return np.float32(x) * 2


@job
def echo_types(value):
    """Report the types a downstream job receives."""
    executed("echo_types")
    return {key: type(item).__name__ for key, item in value.items() if isinstance(key, str)}


@job
def monty_dicts(x: float):
    """Return dicts a decoder would take for something else: a monty dict of a Structure that
    ``Structure.from_dict`` would not give back (an extra key, no charge), and Mongo-style
    ``$`` keys. jobflow stores them as the dicts they are."""
    executed("monty_dicts")
    lattice = {"matrix": [[x, 0.0, 0.0], [0.0, x, 0.0], [0.0, 0.0, x]]}
    site = {"species": [{"element": "Si", "occu": 1}], "abc": [0.0, 0.0, 0.0], "label": "Si"}
    return {
        "structure": {
            "@module": "pymatgen.core.structure",
            "@class": "Structure",
            "lattice": lattice,
            "sites": [site],
            "energies": [-10.8, -10.9],
        },
        "when": {"$date": "2024-05-01T00:00:00Z"},
        "oid": {"$oid": "0123456789ab0123456789ab"},
    }
