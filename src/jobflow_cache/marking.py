"""``cache_flow``: mark every job of a flow so that any manager serves or records it.

(Stub: being built for issue 13.)
"""

from __future__ import annotations

from typing import Any

__all__ = ["cache_flow"]


def cache_flow(flow_or_job: Any, **options: Any) -> Any:
    """Mark every job of ``flow_or_job`` for caching under any manager; returns it."""
    raise NotImplementedError("cache_flow is being built (issue 13)")
