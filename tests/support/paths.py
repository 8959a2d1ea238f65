"""Where the checkout under test is, for the subprocesses tests start.

A subprocess must import the package the tests import: the one on ``PYTHONPATH`` when the
tests run from a second worktree (``PYTHONPATH=<worktree>/src``), not the editable install's,
which points at another checkout. :func:`pythonpath` puts that package's ``src`` folder first,
then the checkout's root (``tests.*`` and ``benchmarks.*`` import by path).
"""

from __future__ import annotations

import os
from pathlib import Path

import jobflow_cache

__all__ = ["ROOT", "SRC", "pythonpath"]

#: The checkout the tests belong to.
ROOT = Path(__file__).resolve().parents[2]
#: The ``src`` folder of the ``jobflow_cache`` these tests imported.
SRC = Path(jobflow_cache.__file__).resolve().parents[1]


def pythonpath(*first: str | os.PathLike[str]) -> str:
    """``PYTHONPATH`` for a subprocess: ``first``, then :data:`SRC` and :data:`ROOT`.

    Examples
    --------
    >>> pythonpath("/code").split(os.pathsep)[0], pythonpath().split(os.pathsep)[-1] == str(ROOT)
    ('/code', True)
    """
    return os.pathsep.join(str(p) for p in (*first, SRC, ROOT))
