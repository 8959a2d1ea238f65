"""What the cache did: a :class:`CacheReport` per session, and the record in each job's metadata.

Every job a cache session sees is counted once in its report, by outcome (:class:`.Outcome`):
served (:func:`note_hit`) or run (:func:`note_run`). The same call writes the job's
``metadata["jobflow_cache"]`` record (:func:`mark`): the outcome, the digest and its scheme,
the uuid of the job an entry was recorded from, and the options the user had set there, which
jobflow stores with the output. ``run_locally`` adds ``failed`` and ``not_run`` and logs
:meth:`CacheReport.summary` at the end of a run.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobflow import Job

from jobflow_cache.entry import CacheEntry
from jobflow_cache.execution.options import META_KEY, OPTION_KEYS, JobOptions
from jobflow_cache.hashing.canonical import SCHEME
from jobflow_cache.store import Outcome

__all__ = [
    "KEPT_MISSES",
    "UNCACHED_REASONS",
    "CacheReport",
    "mark",
    "note_hit",
    "note_run",
    "progress",
    "set_reason",
]

#: Hits and recordings are reported on a child of jobflow's logger, so they show wherever
#: jobflow's own "Starting job" lines do (``run_locally(log=True)``), in the same format.
progress = logging.getLogger("jobflow.cache")

#: Misses whose digests a :class:`CacheReport` keeps (the summary explains the first few).
KEPT_MISSES = 20

#: Why a job ran without the cache, by outcome (the summary's "uncached" reasons).
UNCACHED_REASONS = {
    "uncacheable": "input cannot be hashed",
    "error": "cache store unavailable",
    "disabled": "caching turned off for the job",
}


@dataclass
class CacheReport:
    """What one cache session did: outcome counts, executed and served jobs, time saved.

    ``run_locally`` also fills ``failed`` (the job raised), ``not_run`` (skipped: a parent
    failed or stopped the flow) and, when the whole run had no cache, ``off`` (why); its
    summary is logged on the ``jobflow.cache`` logger at the end of a run (``log=True``).
    """

    outcomes: Counter[str] = field(default_factory=Counter)
    served: list[str] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    time_saved: float = 0.0
    failed: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    #: ``(job name, digest)`` of the first :data:`KEPT_MISSES` misses
    misses: list[tuple[str, str]] = field(default_factory=list)
    #: why no job of the run used the cache (disabled, unusable store, bad setting), if so
    off: str | None = None

    @property
    def hits(self) -> int:
        """Number of jobs served from the cache."""
        return self.outcomes[Outcome.HIT.value]

    def uncached(self) -> dict[str, int]:
        """Jobs that ran without the cache, by reason."""
        return {
            reason: self.outcomes[outcome]
            for outcome, reason in UNCACHED_REASONS.items()
            if self.outcomes[outcome] and not (outcome == "error" and self.off)
        }

    def summary(self) -> str:
        """What happened, e.g. ``"3 jobs: 2 served from cache, 1 executed; 4.1 s of compute
        saved"``; failed, not run and uncached jobs and a cache that was off are named too.

        Examples
        --------
        >>> report = CacheReport()
        >>> report.served.append("relax")
        >>> report.summary()
        '1 job: 1 served from cache, 0 executed; 0.0 s of compute saved'
        >>> report = CacheReport(executed=["a", "b"], failed=["b"], not_run=["c"])
        >>> report.outcomes["uncacheable"] += 1
        >>> print(report.summary().replace("; ", ";\\n"))
        3 jobs: 0 served from cache, 2 executed (1 failed), 1 not run;
        0.0 s of compute saved;
        1 ran uncached (input cannot be hashed)
        """
        total = len(self.served) + len(self.executed) + len(self.not_run)
        executed = f"{len(self.executed)} executed"
        if self.failed:
            executed += f" ({len(self.failed)} failed)"
        parts = [f"{len(self.served)} served from cache", executed]
        if self.not_run:
            parts.append(f"{len(self.not_run)} not run")
        text = f"{total} job{'' if total == 1 else 's'}: {', '.join(parts)}"
        if self.off is not None:
            return f"{text}; cache off: {self.off}"
        text += f"; {self.time_saved:.1f} s of compute saved"
        uncached = self.uncached()
        if uncached:
            reasons = ", ".join(
                f"{n} {reason}" if len(uncached) > 1 else reason for reason, n in uncached.items()
            )
            text += f"; {sum(uncached.values())} ran uncached ({reasons})"
        return text


def mark(
    job: Job,
    options: JobOptions,
    digest: str | None,
    outcome: Outcome,
    source_uuid: str | None,
) -> None:
    """Record what the cache did in the job's metadata (stored with its output)."""
    previous = job.metadata.get(META_KEY) if job.metadata else None
    record: dict[str, Any] = {}
    if isinstance(previous, Mapping):
        record.update({k: previous[k] for k in OPTION_KEYS if k in previous})
    record["outcome"] = outcome.value
    if digest is not None:
        record["digest"] = digest
        record["scheme"] = SCHEME
    if source_uuid is not None:
        record["source_uuid"] = source_uuid
    job.metadata[META_KEY] = record


def note_run(
    report: CacheReport,
    job: Job,
    options: JobOptions,
    digest: str | None,
    outcome: Outcome,
    *,
    marked: bool = True,
) -> None:
    """Count a job that is about to run and (``marked``) record why in its metadata."""
    report.outcomes[outcome.value] += 1
    report.executed.append(job.name)
    if digest is not None and len(report.misses) < KEPT_MISSES:
        report.misses.append((job.name, digest))
    if marked:
        mark(job, options, digest, outcome, None)


def note_hit(report: CacheReport, job: Job, options: JobOptions, entry: CacheEntry) -> None:
    """Count a job served from ``entry`` and record it in its metadata."""
    mark(job, options, entry.digest, Outcome.HIT, entry.source_uuid)
    report.outcomes[Outcome.HIT.value] += 1
    report.served.append(job.name)
    report.time_saved += entry.duration


def set_reason(job: Job, reason: str) -> None:
    """Say in the job's metadata record why it ran as it did (when it has a record)."""
    record = job.metadata.get(META_KEY)
    if isinstance(record, dict):
        record["reason"] = reason
