"""Where an object area keeps its objects, and how it is set up.

Objects live at ``<root>/<xx>/<rest-of-hex>``. :class:`AreaLayout` holds the root and the
settings and is the base of every part of :class:`.ObjectArea`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

__all__ = [
    "HEX_FANOUT",
    "HEX_ID",
    "HEX_REST",
    "VERIFY_FILES_LIMIT",
    "AreaLayout",
    "PlaceMode",
]

VERIFY_FILES_LIMIT = 1 << 30
"""Default size (bytes) up to which a hit verifies each file object by its content."""

HEX_ID = re.compile(r"[0-9a-f]{32}")
HEX_FANOUT = re.compile(r"[0-9a-f]{2}")
HEX_REST = re.compile(r"[0-9a-f]{30}")

PlaceMode = Literal["link", "copy"]


class AreaLayout:
    """The root of an object area, its settings and the path of an object (the parameters
    are :class:`.ObjectArea`'s)."""

    def __init__(
        self,
        root: str | Path,
        *,
        fsync: bool = False,
        verify_limit: int = VERIFY_FILES_LIMIT,
        serve_code: bool = False,
    ) -> None:
        self.root: Path = Path(root)
        self.fsync = fsync
        self.verify_limit = verify_limit
        self.serve_code = serve_code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({os.fspath(self.root)!r})"

    # ----------------------------------------------------------------- naming

    def path_of(self, xxh3: str) -> Path:
        """Return the path an object with digest ``xxh3`` has (or would have) in the area.

        Raises
        ------
        ValueError
            If ``xxh3`` is not 32 lowercase hex digits (guards against path injection from a
            tampered manifest).
        """
        if not isinstance(xxh3, str) or not HEX_ID.fullmatch(xxh3):
            raise ValueError(f"not an xxh3_128 hex digest: {xxh3!r}")
        return self.root / xxh3[:2] / xxh3[2:]
