"""The drop-in :func:`run_locally`: jobflow's local manager, linear in the number of jobs.

:mod:`.manager` is the loop (jobflow's, statement by statement, with the cache's one
interception); :mod:`.view` is the indexed view of a run's ``MemoryStore`` s that keeps it
linear.
"""

from __future__ import annotations

from jobflow_cache.local.manager import run_locally

__all__ = ["run_locally"]
