"""Exceptions and warnings raised by jobflow-cache."""

from __future__ import annotations

import logging
import warnings

__all__ = [
    "CacheError",
    "CacheWarning",
    "CorruptEntryError",
    "FilesUnavailableError",
    "StoreUnavailableError",
    "UnhashableInputError",
    "warn",
]

logger = logging.getLogger(__name__)


class CacheError(Exception):
    """Base class of every error raised by jobflow-cache."""


class UnhashableInputError(CacheError, TypeError):
    """An input value has no canonical encoding, so the call cannot be digested.

    Parameters
    ----------
    message
        What went wrong.
    path
        Where in the inputs the value sits, e.g. ``"structure.sites[3]"``.
    """

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        where = f" at {path!r}" if path else ""
        super().__init__(f"{message}{where}")


class CorruptEntryError(CacheError):
    """A cache entry cannot be decoded or fails its checksum."""


class FilesUnavailableError(CacheError):
    """The files recorded for an entry cannot be found or do not match the manifest."""


class StoreUnavailableError(CacheError):
    """The cache store cannot be reached (connection refused, bad spec, ...)."""


class CacheWarning(UserWarning):
    """A non-fatal cache problem: the job runs uncached and the workflow continues."""


def warn(message: str, stacklevel: int = 2) -> None:
    """Issue a :class:`CacheWarning`; where warnings are turned into errors, log it instead.

    Under ``python -W error`` or pytest's ``filterwarnings = ["error"]`` a warning raised inside
    a job would fail that job, and the cache must never fail a job that would succeed without
    it. The message is then logged at ERROR level on ``jobflow_cache.errors`` (with
    ``extra={"jfc_swallowed_warning": True}``) and the job goes on.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error", CacheWarning)
    ...     warn("jobflow-cache: something is off")  # logged, not raised
    """
    try:
        warnings.warn(message, CacheWarning, stacklevel=stacklevel + 1)
    except CacheWarning:
        logger.error(
            "%s (a CacheWarning, logged because warnings are errors here)",
            message,
            extra={"jfc_swallowed_warning": True},
        )
