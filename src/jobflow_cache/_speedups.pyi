"""Optional C accelerator of :mod:`jobflow_cache.hashing` (see ``_speedups.c``)."""

from collections.abc import Callable, Container
from typing import Any

def tree(
    obj: Any,
    depth: int,
    max_depth: int,
    fallback: Callable[[Any, Any, int], Any],
    hook: Callable[[str], tuple[str, Any] | None] | None,
    exact: Container[str] | None,
    markers: tuple[str, ...] | None,
    /,
) -> Any: ...
def configure(error_type: type[BaseException], /) -> None: ...
