"""Every exception and warning jobflow-cache raises, and how a warning reaches the user.

:class:`CacheError` is the base of the public ones. :class:`TooLargeError` and
:class:`CallMismatchError` derive from ``ValueError`` and ``TypeError`` instead: they say
"this entry's field is too large to decode" (the cache treats the entry as invalid and runs
the job) and "these arguments do not fit the function" (the job runs uncached and fails as
it would without the cache).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import types
import warnings

__all__ = [
    "AmbiguousDigestError",
    "CacheError",
    "CacheWarning",
    "CallMismatchError",
    "CorruptEntryError",
    "FilesUnavailableError",
    "FolderConflictError",
    "InputTooLargeError",
    "SettingsError",
    "StoreUnavailableError",
    "TooLargeError",
    "UnhashableInputError",
    "UnknownDigestError",
    "UnsafeManifestError",
    "UntrustedValueError",
    "trim_traceback",
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


class SettingsError(CacheError, ValueError):
    """A ``JOBFLOW_CACHE_*`` setting or the settings file is wrong: one line naming the
    environment variable or file key, the bad value and the allowed values."""


class InputTooLargeError(CacheError):
    """A folder named in a job's inputs is too large to be hashed by content (too many files,
    or too many bytes not hashed before); the job runs uncached.

    Parameters
    ----------
    message
        What went wrong.
    path
        The folder (or file) named in the inputs.
    """

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        super().__init__(message)


class FolderConflictError(CacheError):
    """A hit cannot be served into the run folder without destroying or hiding work: a path
    the recorded job changed holds something else than what that job found (or left), or a
    file the cache did not store is no longer in the recording run's folder. The job runs
    (a miss whose reason is this error's message)."""


class StoreUnavailableError(CacheError):
    """The cache store cannot be reached (connection refused, bad spec, ...)."""


# ------------------------------------------------ raised by one layer, caught or shown by another


class UnknownDigestError(CacheError):
    """No entry has a digest starting with the given prefix."""


class AmbiguousDigestError(CacheError):
    """Several entries have a digest starting with the given prefix.

    Attributes
    ----------
    candidates
        ``(digest, name)`` of the entries found (the message names ``shown_at_most`` of them).
    """

    def __init__(
        self, prefix: str, candidates: list[tuple[str, str]], shown_at_most: int = 10
    ) -> None:
        self.prefix = prefix
        self.candidates = candidates
        shown = ", ".join(f"{digest} ({name})" for digest, name in candidates[:shown_at_most])
        more = ", ..." if len(candidates) > shown_at_most else ""
        super().__init__(f"digest prefix {prefix!r} is ambiguous: {shown}{more}")


class UnsafeManifestError(FilesUnavailableError):
    """A manifest that serving must refuse as a whole: a path that is not a normalised
    relative path below the run folder, a control character, a path below another record
    that is no folder, a setuid/setgid bit, or (``SERVE_CODE_FILES`` off) a file Python or a
    shell would run (:data:`CODE_FILE_PATTERNS`) or a symlink leading out of the run folder.
    Nothing is changed; the hit is not served and the job runs."""


class UntrustedValueError(CorruptEntryError):
    """A cached value names a module, class or function it may not name (see
    :func:`check_trusted`)."""


class CallMismatchError(TypeError):
    """The arguments do not fit the job function's signature (the call would raise)."""


class TooLargeError(ValueError):
    """A stored field is larger (once decompressed) than ``MAX_DECODED_SIZE``."""


class CacheWarning(UserWarning):
    """A non-fatal cache problem: the job runs uncached and the workflow continues."""


def warn(message: str, stacklevel: int = 2) -> None:
    """Issue a :class:`CacheWarning` at the user's call; where warnings are turned into
    errors, log it instead.

    The warning names the first frame outside jobflow-cache and jobflow (the user's
    ``run_locally`` call, or the manager that runs the job), not the line of the cache that
    noticed the problem; ``stacklevel`` is used only when no such frame exists.

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
        warnings.warn(message, CacheWarning, stacklevel=_user_stacklevel(stacklevel + 1))
    except CacheWarning:
        logger.error(
            "%s (a CacheWarning, logged because warnings are errors here)",
            message,
            extra={"jfc_swallowed_warning": True},
        )


def _library_dirs() -> tuple[str, ...]:
    dirs = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
    with contextlib.suppress(ImportError):
        import jobflow

        dirs.append(os.path.dirname(os.path.abspath(jobflow.__file__)) + os.sep)
    dirs.append(os.path.abspath(contextlib.__file__))
    return tuple(dirs)


_LIBRARY: tuple[str, ...] | None = None


def _user_stacklevel(fallback: int) -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in :func:`warn`) of the first frame outside
    jobflow-cache and jobflow."""
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = _library_dirs()
    frame = sys._getframe(2)  # the caller of warn()
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level if frame is not None else fallback


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _ours(tb: types.TracebackType) -> bool:
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE)


def trim_traceback(
    tb: types.TracebackType | None, keep_first: bool = True
) -> types.TracebackType | None:
    """``tb`` without the frames of jobflow-cache (the first kept with ``keep_first``), so a
    failed job shows the frames plain jobflow shows. An error raised by jobflow-cache itself
    (its innermost frame is ours) keeps every frame.
    """
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    if not entries or _ours(entries[-1]):
        return entries[0] if entries else None
    kept = [e for i, e in enumerate(entries) if (keep_first and i == 0) or not _ours(e)]
    trimmed: types.TracebackType | None = None
    for entry in reversed(kept):
        trimmed = types.TracebackType(trimmed, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return trimmed
