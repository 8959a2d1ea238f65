"""Job functions and flow shapes of the benchmarks, importable by path in any process.

Every job takes a distinct ``tag`` so that no two jobs of one flow share a digest: a cold run is
then all misses and a warm run all hits. ``work`` seconds of sleep stand for a job's real work
(0 for the trivial jobs that measure pure executor and cache overhead).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from jobflow import Flow, Job, Response, job

__all__ = [
    "SHAPES",
    "big_output",
    "build",
    "final_output",
    "memo_chain",
    "payload",
    "plain_step",
]

logger = logging.getLogger(__name__)

#: Tag offset of the jobs a dynamic job adds, so they never collide with the chain's own tags.
_ADDED = 10_000_000


def _flow(jobs: Sequence[Job], output: Any = None) -> Flow:
    items: list[Flow | Job] = list(jobs)
    return Flow(items, output=output)


def _work(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


@job
def step(x: int, tag: int, work: float = 0.0) -> int:
    """One unit of work: ``x + 1``."""
    _work(work)
    return x + 1


@job
def gather(values: list[Any], tag: int = 0) -> int:
    """Sum the outputs of a fan-out (nested lists are flattened)."""
    total = 0
    for value in values:
        total += sum(value) if isinstance(value, list) else value
    return total


@job
def join(a: int, b: int, tag: int) -> int:
    """Join two branches: ``max(a, b) + 1``."""
    return max(a, b) + 1


@job
def generate(n: int, offset: int = 0, work: float = 0.0) -> Response:
    """Replace itself with ``n`` independent jobs whose outputs form a list."""
    jobs = [step(offset + i, offset + i, work) for i in range(n)]
    return Response(replace=_flow(jobs, output=[j.output for j in jobs]))


@job
def generate_nested(outer: int, inner: int, work: float = 0.0) -> Response:
    """Replace itself with ``outer`` jobs that each replace themselves with ``inner`` jobs."""
    jobs = [generate(inner, offset=k * inner, work=work) for k in range(outer)]
    return Response(replace=_flow(jobs, output=[j.output for j in jobs]))


@job
def add_step(x: int, tag: int, work: float = 0.0) -> Response:
    """A chain link that adds one extra job to the flow (``Response.addition``)."""
    _work(work)
    return Response(output=x + 1, addition=Flow([step(x, _ADDED + tag, work)]))


@job
def detour_step(x: int, tag: int, work: float = 0.0) -> Response:
    """A chain link that detours through one extra job before its children run."""
    _work(work)
    return Response(output=x + 1, detour=Flow([step(x, _ADDED + tag, work)]))


def _chain(n: int, work: float, link: Any = step) -> tuple[Flow, Job]:
    jobs = [link(0, 0, work)]
    for i in range(1, n):
        jobs.append(link(jobs[-1].output, i, work))
    return _flow(jobs), jobs[-1]


def _fanout(n: int, work: float) -> tuple[Flow, Job]:
    source = step(0, 0, work)
    middle = [step(source.output, i, work) for i in range(1, max(n - 1, 2))]
    last = gather([j.output for j in middle])
    return Flow([source, *middle, last]), last


def _diamond(n: int, work: float) -> tuple[Flow, Job]:
    top = step(0, 0, work)
    jobs = [top]
    for k in range(max(n // 3, 1)):
        left = step(top.output, 3 * k + 1, work)
        right = step(top.output, 3 * k + 2, work)
        top = join(left.output, right.output, 3 * k + 3)
        jobs += [left, right, top]
    return _flow(jobs), top


def _replace(n: int, work: float) -> tuple[Flow, Job]:
    gen = generate(n, 0, work)
    last = gather(gen.output)
    return Flow([gen, last]), last


def _nested(n: int, work: float) -> tuple[Flow, Job]:
    outer = max(round(math.sqrt(n)), 1)
    gen = generate_nested(outer, max(n // outer, 1), work)
    last = gather(gen.output)
    return Flow([gen, last]), last


def _linked(link: Any, n: int, work: float) -> tuple[Flow, Job]:
    jobs = [link(0, 0, work)]
    for i in range(1, max(n // 2, 1)):
        jobs.append(link(jobs[-1].output, i, work))
    return _flow(jobs), jobs[-1]


def _addition(n: int, work: float) -> tuple[Flow, Job]:
    return _linked(add_step, n, work)


def _detour(n: int, work: float) -> tuple[Flow, Job]:
    return _linked(detour_step, n, work)


#: shape name -> (builder, one-line description); every shape runs about ``n`` jobs.
SHAPES: dict[str, tuple[Any, str]] = {
    "chain": (_chain, "n jobs, each uses the previous one's output"),
    "fanout": (_fanout, "1 source -> n-2 parallel jobs -> 1 gather"),
    "diamond": (_diamond, "n/3 diamonds in series: split into 2, join"),
    "replace": (_replace, "dynamic: one job replaces itself with n jobs (Response.replace)"),
    "nested": (_nested, "dynamic: sqrt(n) replaces, each replaced by sqrt(n) jobs"),
    "addition": (_addition, "dynamic: n/2-job chain, each link adds a job (Response.addition)"),
    "detour": (_detour, "dynamic: n/2-job chain, each link detours via a job (Response.detour)"),
}


def build(shape: str, n: int, work: float = 0.0) -> tuple[Flow, Job]:
    """A fresh flow instance of ``shape`` with about ``n`` jobs, and the job whose output ends it.

    Examples
    --------
    >>> flow, last = build("chain", 3)
    >>> len(flow.jobs), last is flow.jobs[-1]
    (3, True)
    """
    return SHAPES[shape][0](n, work)


def final_output(responses: dict[str, dict[int, Response]], last: Job) -> Any:
    """The output of ``last`` in the responses of a run (its highest index, after replaces)."""
    runs = responses.get(last.uuid) or {}
    if not runs:
        return None
    return runs[max(runs)].output


# --------------------------------------------------------------------------- large outputs
def _site(i: int) -> dict[str, Any]:
    """One site of a pymatgen-like structure dict (about 260 bytes of JSON)."""
    f = (i % 997) / 997
    return {
        "species": [{"element": "Si", "occu": 1.0, "oxidation_state": None}],
        "abc": [f, 1 - f, f / 2],
        "xyz": [f * 5.43, (1 - f) * 5.43, f * 2.715],
        "properties": {"magmom": 0.0, "selective_dynamics": [True, True, False]},
        "label": f"Si{i}",
    }


@functools.lru_cache(maxsize=4)
def payload(nbytes: int) -> dict[str, Any]:
    """A JSON-able, dict-heavy output of about ``nbytes`` bytes of JSON (built once per size).

    About three quarters are site dicts (strings, small float lists), the rest a flat list of
    floats, as in a relaxation's structure plus its energy trajectory.
    """
    site = len(json.dumps(_site(500), separators=(",", ":"))) + 1
    sites = max(1, nbytes * 3 // 4 // site)
    floats = max(1, (nbytes - sites * site - 200) // 18)
    return {
        "@module": "pymatgen.core.structure",
        "@class": "Structure",
        "lattice": {"matrix": [[5.43, 0.0, 0.0], [0.0, 5.43, 0.0], [0.0, 0.0, 5.43]]},
        "sites": [_site(i) for i in range(sites)],
        "energies": [-10.84 - k * 1.0e-7 for k in range(floats)],
    }


@job
def big_output(nbytes: int, tag: str) -> dict[str, Any]:
    """Return the (prebuilt) ``payload(nbytes)``: trivial compute, a large output."""
    return payload(nbytes)


def plain_step(x: int, tag: int, work: float = 0.0) -> int:
    """:func:`step` as a plain function (memoised by joblib.Memory for comparison)."""
    _work(work)
    return x + 1


# --------------------------------------------------------------------------- joblib in a flow
#: ``plain_step`` memoised by a ``joblib.Memory`` (set by :func:`memo_chain`).
_MEMOISED: Any = None


@job
def memo_step(x: int, tag: int, work: float = 0.0) -> int:
    """:func:`step` whose body is a ``joblib.Memory`` call of :func:`plain_step`."""
    return _MEMOISED(x, tag, work)


def memo_chain(n: int, memory_dir: str) -> tuple[Flow, Job]:
    """The ``chain`` shape of :func:`memo_step` jobs, memoised in ``memory_dir``: run uncached
    once (joblib misses) and again (joblib hits), it measures a joblib.Memory hit inside the
    same jobflow run as our warm jobs, in place of our cache."""
    global _MEMOISED
    import joblib

    _MEMOISED = joblib.Memory(memory_dir, verbose=0).cache(plain_step)
    return _chain(n, 0.0, memo_step)
