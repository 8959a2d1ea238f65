"""``plan``: which jobs of a flow the cache serves ahead of submission.

(Stub: being built for issue 13.)
"""

from __future__ import annotations

from typing import Any

__all__ = ["Plan", "plan"]


class Plan:
    """What the cache serves ahead of submission (stub)."""

    def apply(self, job_store: Any) -> Any:
        """Write the served jobs into ``job_store``; return the flow still to run."""
        raise NotImplementedError("Plan.apply is being built (issue 13)")


def plan(flow: Any, **options: Any) -> Plan:
    """Plan ``flow`` against the cache (stub)."""
    raise NotImplementedError("plan is being built (issue 13)")
