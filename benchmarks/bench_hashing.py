"""Digest time of realistic job inputs: ours against the usual ways of hashing them.

Methods
-------
``ours``         :func:`jobflow_cache.hashing.digest_value` (canonical, type-tagged, xxh3-128)
``joblib``       ``joblib.hash`` (pickle-based, md5)
``json+sha256``  sha256 of ``json.dumps(..., sort_keys=True)`` (monty's encoder for objects)
``orjson+xxh3``  xxh3-128 of a sorted-key ``orjson`` dump (the practical floor for a dict)
``xxh3 raw``     xxh3-128 of bytes already in memory (the orjson dump, or the array's buffer):
                 the physical limit
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import joblib
import numpy as np
import orjson
import xxhash
from monty.json import MontyEncoder
from pymatgen.core import Lattice, Structure

from benchmarks.common import Mode, fmt_ratio, fmt_seconds, table, time_call
from jobflow_cache.hashing.canonical import digest_value

__all__ = ["hashing_table", "inputs", "run_hashing"]

logger = logging.getLogger(__name__)

METHODS = ("ours", "joblib", "json+sha256", "orjson+xxh3", "xxh3 raw")

_ORJSON = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_SERIALIZE_NUMPY
    | orjson.OPT_NON_STR_KEYS
    | orjson.OPT_PASSTHROUGH_DATACLASS  # Makers are dataclasses: serialize them by as_dict()
)


def structure(sites: int, seed: int = 0) -> Structure:
    """A random periodic structure of ``sites`` sites (Li, Fe, P, O in a cubic box)."""
    rng = np.random.default_rng(seed)
    species = ["Li", "Fe", "P", "O"] * (sites // 4 + 1)
    side = (sites * 12.0) ** (1 / 3)
    return Structure(Lattice.cubic(side), species[:sites], rng.random((sites, 3)))


def vasp_input_set(s: Structure) -> dict[str, Any]:
    """An atomate2-style VASP input set as a dict: INCAR, KPOINTS, POTCAR spec, structure."""
    incar = {
        "ALGO": "Fast",
        "EDIFF": 0.0005,
        "EDIFFG": -0.05,
        "ENCUT": 520,
        "IBRION": 2,
        "ISIF": 3,
        "ISMEAR": -5,
        "ISPIN": 2,
        "LASPH": True,
        "LORBIT": 11,
        "LREAL": "Auto",
        "LWAVE": False,
        "LCHARG": True,
        "NELM": 100,
        "NSW": 99,
        "PREC": "Accurate",
        "SIGMA": 0.05,
        "KSPACING": None,
        "LMAXMIX": 4,
        "MAGMOM": [0.6] * len(s),
        "LDAU": True,
        "LDAUJ": [0, 0, 0, 0],
        "LDAUL": [0, 2, 0, 0],
        "LDAUU": [0, 5.3, 0, 0],
        "LDAUTYPE": 2,
    }
    return {
        "@module": "atomate2.vasp.sets.core",
        "@class": "RelaxSetGenerator",
        "incar": incar,
        "kpoints": {
            "generation_style": "Gamma",
            "kpoints": [[4, 4, 4]],
            "usershift": [0, 0, 0],
            "comment": "pymatgen with grid density = 1000 / number of atoms",
        },
        "potcar_spec": [{"titel": f"PAW_PBE {el} 06Sep2000", "hash": "0" * 32} for el in "LFPO"],
        "structure": s.as_dict(),
        "user_incar_settings": {"ENCUT": 520, "EDIFF": 5e-4},
        "user_kpoints_settings": {"reciprocal_density": 64},
        "auto_ispin": False,
        "vdw": None,
    }


def _atomate2_maker() -> Any | None:
    try:
        from atomate2.vasp.jobs.core import RelaxMaker
    except Exception as err:  # atomate2 is an optional extra
        logger.info("atomate2 RelaxMaker unavailable: %s", err)
        return None
    return RelaxMaker()


def inputs(mode: Mode) -> dict[str, Any]:
    """Named inputs, from an 8-site structure to a 1e6-element float64 array."""
    found: dict[str, Any] = {}
    for sites in (8, 100) if mode.quick else (8, 100, 1000):
        s = structure(sites)
        found[f"Structure {sites} sites (object)"] = s
        found[f"Structure {sites} sites (dict)"] = s.as_dict()
    found["VASP input set dict (8-site structure)"] = vasp_input_set(structure(8))
    if not mode.quick:  # importing atomate2.vasp takes seconds
        maker = _atomate2_maker()
        if maker is not None:
            found["atomate2 RelaxMaker (object)"] = maker
            found["atomate2 RelaxMaker.as_dict()"] = maker.as_dict()
    found["float64 array, 1e6 elements"] = np.random.default_rng(1).random(1_000_000)
    return found


def _as_json(obj: Any) -> Any:
    """orjson ``default``: MSONable objects by ``as_dict()``; str/int/float subclasses (such
    as ruamel's ``ScalarFloat`` in atomate2 input sets) as their base type."""
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    for base in (bool, int, float, str):
        if isinstance(obj, base):
            return base(obj)
    raise TypeError(type(obj).__name__)


def methods(obj: Any) -> dict[str, Callable[[], Any]]:
    """The hashing methods bound to ``obj``."""
    if isinstance(obj, np.ndarray):
        raw = np.ascontiguousarray(obj).tobytes()  # a copy: the timing is of hashing only

        def sha256_json() -> Any:
            return hashlib.sha256(json.dumps(obj.tolist()).encode()).hexdigest()

    else:
        raw = orjson.dumps(obj, default=_as_json, option=_ORJSON)

        def sha256_json() -> Any:
            text = json.dumps(obj, sort_keys=True, cls=MontyEncoder)
            return hashlib.sha256(text.encode()).hexdigest()

    return {
        "ours": lambda: digest_value(obj),
        "joblib": lambda: joblib.hash(obj),
        "json+sha256": sha256_json,
        "orjson+xxh3": lambda: xxhash.xxh3_128_hexdigest(
            orjson.dumps(obj, default=_as_json, option=_ORJSON)
        ),
        "xxh3 raw": lambda: xxhash.xxh3_128_hexdigest(raw),
    }


def run_hashing(mode: Mode) -> list[dict[str, Any]]:
    """Seconds per digest for every input and method."""
    min_time, repeats, max_total = (0.02, 3, 0.3) if mode.quick else (0.2, 5, 5.0)
    rows: list[dict[str, Any]] = []
    for name, obj in inputs(mode).items():
        size = len(orjson.dumps(obj, default=_as_json, option=_ORJSON))
        for method, fn in methods(obj).items():
            if mode.quick and method == "json+sha256" and size > 10**6:
                continue  # about a second per call: not worth it in a smoke run
            try:
                timing = time_call(fn, min_time=min_time, repeats=repeats, max_total=max_total)
            except Exception as err:  # one method failing on one input must not hide the rest
                rows.append({"input": name, "method": method, "bytes": size, "error": repr(err)})
                continue
            rows.append({"input": name, "method": method, "bytes": size, **timing})
        logger.info("hashing: %s", name)
    return rows


def hashing_table(rows: list[dict[str, Any]]) -> str:
    """Median time per digest, one row per input, and ours relative to the others."""
    by_input: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_input.setdefault(row["input"], {})[row["method"]] = row
    out = []
    for name, found in by_input.items():

        def median(method: str, found: dict[str, dict[str, Any]] = found) -> float | None:
            row = found.get(method)
            return None if row is None or "median" not in row else float(row["median"])

        def cell(method: str, found: dict[str, dict[str, Any]] = found) -> str:
            row = found.get(method)
            return "error" if row and "error" in row else fmt_seconds(median(method))

        def ratio(a: float | None, b: float | None) -> str:
            return fmt_ratio(a / b) if a and b else "-"

        ours = median("ours")
        size = next(iter(found.values()))["bytes"]
        out.append(
            [name, f"{size / 1e3:.0f}"]
            + [cell(m) for m in METHODS]
            + [
                ratio(median("joblib"), ours),
                ratio(ours, median("orjson+xxh3")),
                ratio(ours, median("xxh3 raw")),
            ]
        )
    return table(
        "Hashing: median time per digest",
        ["input", "kB json", *METHODS, "joblib/ours", "ours/orjson", "ours/raw"],
        out,
    )
