"""Shared helpers of the benchmarks: timing, worker subprocesses, machine facts, tables."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "MARK",
    "ROOT",
    "STYLE",
    "Mode",
    "fmt_ratio",
    "fmt_seconds",
    "machine_facts",
    "percentile",
    "collect_worker",
    "run_worker",
    "spawn_worker",
    "table",
    "time_call",
]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]

#: Prefix of the result lines a worker prints on stdout.
MARK = "@@BENCH "


@dataclass
class Mode:
    """What one run of the suite measures (quick smoke or full)."""

    name: str
    tmp: Path
    #: seconds the flow-shape runs may take in all; later (larger, lower-priority) runs are
    #: skipped once it is used up. None: no limit.
    flow_budget_s: float | None = None
    quick: bool = field(init=False)

    def __post_init__(self) -> None:
        self.quick = self.name == "quick"


# --------------------------------------------------------------------------- timing
def time_call(
    fn: Callable[[], Any],
    min_time: float = 0.2,
    repeats: int = 5,
    max_total: float = 5.0,
    max_number: int = 10**6,
) -> dict[str, float]:
    """Seconds per call of ``fn``: median (and min) over ``repeats`` batches of ``min_time`` each.

    The batch size doubles until one batch lasts ``min_time`` (like ``timeit.autorange``), so
    both microsecond and second-long calls are timed with a bounded total cost; no new batch
    starts once ``max_total`` seconds have been spent.
    """
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or number >= max_number:
            break
        number *= 2 if elapsed < min_time / 4 else max(2, math.ceil(min_time / elapsed))
    per_call = [elapsed / number]
    spent = elapsed
    for _ in range(repeats - 1):
        if spent + elapsed > max_total:
            break
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - t0
        spent += elapsed
        per_call.append(elapsed / number)
    return {"median": statistics.median(per_call), "min": min(per_call), "number": number}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# --------------------------------------------------------------------------- workers
def spawn_worker(
    tasks: list[dict[str, Any]], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``python -m benchmarks.worker`` on ``tasks`` in a fresh process (not waiting).

    The worker gets a clean cache environment: no ``JOBFLOW_CACHE_*`` variable of the caller
    and no settings file, so the user's own cache is never touched.
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFLOW_CACHE_")}
    full_env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        JOBFLOW_CACHE_CONFIG_FILE=os.devnull,
        PYTHONHASHSEED="0",
        **(env or {}),
    )
    cwd.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        task.setdefault("workdir", str(cwd))
    fd, name = tempfile.mkstemp(prefix="tasks-", suffix=".json", dir=cwd)
    with os.fdopen(fd, "w") as fh:
        json.dump(tasks, fh)
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.worker", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=full_env,
    )


def collect_worker(
    proc: subprocess.Popen[str], tasks: list[dict[str, Any]], timeout: float
) -> list[dict[str, Any]]:
    """Wait for a worker; one result per task, in order.

    When the process exceeds ``timeout`` seconds it is killed: the task it was running is
    marked ``timeout`` and the ones after it ``skipped``.
    """
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        stdout, stderr = proc.communicate()  # everything printed before the kill
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): never leave the worker running
        proc.kill()
        proc.wait()
        raise
    results = [
        json.loads(line[len(MARK) :]) for line in stdout.splitlines() if line.startswith(MARK)
    ]
    out: list[dict[str, Any]] = []
    for i, _task in enumerate(tasks):
        if i < len(results):
            out.append(results[i])
        elif timed_out and i == len(results):
            out.append({"ok": False, "status": "timeout", "timeout_s": timeout})
        elif timed_out:
            out.append({"ok": False, "status": "skipped", "error": "worker timed out earlier"})
        else:
            out.append(
                {
                    "ok": False,
                    "status": "error",
                    "error": f"worker exited with code {proc.returncode} before this task",
                    "traceback": stderr[-3000:],
                }
            )
    for result in out:
        result.setdefault("status", "ok" if result.get("ok") else "error")
    return out


def run_worker(
    tasks: list[dict[str, Any]], timeout: float, cwd: Path, env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Run ``tasks`` in one fresh worker process and return their results (see above)."""
    return collect_worker(spawn_worker(tasks, cwd, env), tasks, timeout)


# --------------------------------------------------------------------------- facts
def _git(*args: str) -> str:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.strip()


def machine_facts() -> dict[str, Any]:
    """CPU, memory, Python, package versions and the git commit being measured."""
    versions: dict[str, str | None] = {}
    for name in (
        "jobflow-cache",
        "jobflow",
        "maggma",
        "monty",
        "pymatgen",
        "atomate2",
        "numpy",
        "orjson",
        "xxhash",
        "joblib",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import psutil

        memory_gb = round(psutil.virtual_memory().total / 2**30, 1)
        load = [round(x, 2) for x in os.getloadavg()]
    except (ImportError, OSError):
        memory_gb, load = None, []
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from jobflow_cache import _speedups  # noqa: F401

        speedups = True
    except ImportError:
        speedups = False
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": memory_gb,
        "load_average": load,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions,
        "hashing_speedups": speedups,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


# --------------------------------------------------------------------------- formatting
def fmt_seconds(value: float | None, lower_bound: bool = False) -> str:
    """``1.23 s``, ``45.6 ms``, ``7.8 us``; ``> x`` for a lower bound; ``-`` for None."""
    if value is None:
        return "-"
    prefix = "> " if lower_bound else ""
    if value >= 1:
        return f"{prefix}{value:.2f} s"
    if value >= 1e-3:
        return f"{prefix}{value * 1e3:.1f} ms"
    return f"{prefix}{value * 1e6:.1f} us"


def fmt_ratio(value: float | None, lower_bound: bool = False) -> str:
    """``12.3x`` (``>= 12.3x`` for a lower bound); ``-`` for None."""
    if value is None:
        return "-"
    return f"{'>= ' if lower_bound else ''}{value:.3g}x"


#: How :func:`table` renders: plain text for the terminal, or Markdown for docs/performance.md.
STYLE = {"markdown": False}


def _align(rows: Sequence[Sequence[Any]], column: int) -> str:
    """Markdown alignment of a column: right for numbers (most cells start like one)."""
    cells = [str(row[column]) for row in rows if str(row[column]) not in ("", "-")]
    numeric = sum(bool(_NUMBER.match(cell)) for cell in cells)
    return "--:" if cells and numeric * 2 >= len(cells) else "---"


_NUMBER = re.compile(r"^(>=? |<=? |[+-])?\d")


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table with a title line: plain text, or Markdown when ``STYLE["markdown"]`` is set."""
    if STYLE["markdown"]:
        lines = [f"**{title}**", ""]
        for k, row in enumerate([header, *rows]):
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
            if k == 0:
                lines.append("|" + "|".join(_align(rows, i) for i in range(len(row))) + "|")
        return "\n".join(lines)
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [f"== {title}"]
    for k, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if k and i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
            ).rstrip()
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
