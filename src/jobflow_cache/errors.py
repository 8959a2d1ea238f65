"""Exceptions and warnings raised by jobflow-cache."""

from __future__ import annotations

__all__ = [
    "CacheError",
    "CacheWarning",
    "CorruptEntryError",
    "FilesUnavailableError",
    "StoreUnavailableError",
    "UnhashableInputError",
]


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
