"""The cache's side of the store for one session: its health, and the writes behind a run.

:class:`StoreSession` owns everything the execution core does *to* the :class:`.CacheStore`:

* **Health**, one :class:`Health` value: the store is connected once, on first use; a store
  that cannot be built or reached warns once and every job runs uncached
  (:attr:`Health.UNAVAILABLE`); a store that fails after it connected warns once too, and is
  still used, its later failures logged only (:attr:`Health.FAILING`). Nothing here ever
  raises into a job.
* **Reads**: one lookup path (:meth:`StoreSession.lookup`), which sees the entries queued by
  this process before the store does.
* **Writes**: inside an activated run, entries and hit counts go through a
  :class:`.WriteBehind` made on first use and closed with the last run; outside, straight to
  the store. A role that writes nothing (``writes=False``) drops them, and hands out a
  coordinator that reads aliases but never writes them. Entries of jobs run inside
  :class:`Accepting` are held until jobflow accepted their output.
* **Coordination**: the store's claims and aliases (:mod:`.shared`), looked up once.

A full file system is warned about once per run (:func:`warn_not_cached`).
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any

from jobflow import Job

from jobflow_cache.entry import CacheEntry
from jobflow_cache.errors import CacheError, SettingsError, StoreUnavailableError, warn
from jobflow_cache.execution.claims import Coordinator, coordinator_of
from jobflow_cache.execution.report import CacheReport
from jobflow_cache.store import CacheStore, Lookup, Outcome, WriteBehind

__all__ = [
    "HELD",
    "Accepting",
    "Health",
    "Held",
    "StoreSession",
    "disk_full",
    "warn_not_cached",
]

logger = logging.getLogger(__name__)


class Health(Enum):
    """Where a session stands with its store."""

    #: not connected yet (connected on first use)
    NEW = "new"
    CONNECTED = "connected"
    #: connected, then failed: warned once; still used, later failures are logged only
    FAILING = "failing"
    #: could not be built or connected: warned once; every job runs uncached
    UNAVAILABLE = "unavailable"


class StoreSession:
    """Health, reads and writes of one cache session's store (see the module docstring).

    Parameters
    ----------
    store
        The cache store.
    report
        The session's report: ``off`` says why the store is unavailable.
    spec_error
        Why the store could not be built (a bad setting or store spec): connecting raises
        it, so the session warns once, on first use, and runs every job uncached.
    writes
        False: nothing is written (entries, hit counts, aliases).
    wanted
        Whether claims or folder records were asked for (DEDUP, EXCLUSIVE_DIRS): a store
        without them is then warned about.
    """

    def __init__(
        self,
        store: CacheStore,
        report: CacheReport,
        *,
        spec_error: CacheError | None = None,
        writes: bool = True,
        wanted: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.report = report
        self.spec_error = spec_error
        self.writes = writes
        self.health = Health.NEW
        self._wanted = wanted
        self._full_warned = False  # a full file system is warned about once per run
        self._coordinator: Coordinator | None = None
        self._coordination_checked = False
        # while activated (a run): new entries and hit counts are written behind, in batches
        self._lock = threading.Lock()
        self._active = 0
        self.writer: WriteBehind | None = None

    # -- health -----------------------------------------------------------------------------
    @property
    def failed(self) -> bool:
        """Whether the store failed in this session (its one warning was given)."""
        return self.health is Health.FAILING or self.health is Health.UNAVAILABLE

    @property
    def connected(self) -> bool:
        """Whether the store is connected (also when it failed since)."""
        return self.health is Health.CONNECTED or self.health is Health.FAILING

    def connect(self) -> bool:
        """Connect the store once; on failure warn once and run everything uncached."""
        if self.health is not Health.NEW:
            return self.connected
        try:
            if self.spec_error is not None:
                raise self.spec_error
            self.store.connect()
        except Exception as err:  # any failure: the workflow must still run
            self.fail(err)
            return False
        self.health = Health.CONNECTED
        return True

    def close(self) -> None:
        """Write what is still queued, then close the store."""
        self.stop_writer()
        if self.health is Health.CONNECTED:
            self.store.close()
            self.health = Health.NEW
        elif self.health is Health.FAILING:
            self.store.close()
            self.health = Health.UNAVAILABLE

    def fail(self, err: BaseException) -> None:
        """The store failed with ``err``: warn once (with why), and say so in the report."""
        if self.failed:
            return
        self.health = Health.FAILING if self.health is Health.CONNECTED else Health.UNAVAILABLE
        if self._full_warned and disk_full(err):
            # the store's file system filled up: its one warning of this run was given
            self.report.off = f"store {self.store.name} is unavailable (file system full)"
            logger.warning("the cache store is unavailable for this run: %s", err)
            return
        if isinstance(err, SettingsError):
            which = f"is off: {err}"
        elif self.spec_error is not None:
            which = f"store configured by JOBFLOW_CACHE_STORE cannot be built ({err})"
        else:
            # one line: pymongo appends its whole topology to a server selection timeout
            reason = str(err).strip().split("\n")[0].split(", Topology Description")[0]
            which = f"store {self.store.name} is unavailable ({reason})"
        self.report.off = which
        warn(
            f"jobflow-cache: the cache {which}; jobs run uncached for the rest of this run",
            stacklevel=4,
        )

    def store_file_absent(self) -> bool:
        """True when the store is kept in a file (the embedded SQLite store) that does not
        exist."""
        paths = self.store.backend.owned_paths()
        return bool(paths) and not os.path.exists(paths[0])

    # -- runs -------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether a run (:meth:`.Cache.activate`) is going on."""
        return bool(self._active)

    def begin_run(self) -> None:
        """Enter an activated block."""
        with self._lock:
            self._active += 1

    def end_run(self, quiet: bool) -> None:
        """Leave an activated block: write the queue, and stop the writer with the last run.

        With ``quiet`` (the block raised), entries that could not be written are logged, not
        warned about: a warning turned into an error must not hide the run's own exception.
        """
        with self._lock:
            self._active -= 1
            last = self._active == 0
            writer = self.writer
            if last:
                self.writer = None
        try:
            if writer is None:
                return
            if last:
                writer.close()
            else:
                writer.flush()
            self._report_errors_of(writer, quiet=quiet)
        finally:
            if last:  # the next run warns again about a file system still full
                self._full_warned = False

    def flush(self) -> None:
        """Write the entries and hit counts still queued (a no-op when none are)."""
        if self.writer is not None:
            self.writer.flush()
        self.report_write_errors()

    def stop_writer(self) -> None:
        """Write the queue and stop the writer."""
        with self._lock:
            writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
            self._report_errors_of(writer)

    def report_write_errors(self) -> None:
        """Say which queued entries could not be written since the last report."""
        if self.writer is not None:
            self._report_errors_of(self.writer)

    def _report_errors_of(self, writer: WriteBehind, quiet: bool = False) -> None:
        """One line for the entries ``writer`` could not write since the last report: a
        warning, unless the store is already known to be unavailable (its warning was given:
        a store that broke mid-run warns once) or ``quiet``."""
        errors = writer.take_errors()
        if not errors:
            return
        lost = [digest for digests, _ in errors for digest in digests]
        last = errors[-1][1]
        message = (
            f"jobflow-cache: {len(lost)} job result(s) were not cached "
            f"({', '.join(d[:12] for d in lost[:3])}{', ...' if len(lost) > 3 else ''}): {last}"
        )
        if not quiet and not self.failed and isinstance(last, StoreUnavailableError):
            self.fail(last)  # the one warning of a store that broke: later jobs run uncached
            quiet = True
        if quiet or self.failed:
            logger.warning(message)
        else:
            warn(message, stacklevel=4)

    # -- reading and writing ----------------------------------------------------------------
    def lookup(self, digest: str) -> Lookup:
        """The entry of ``digest`` to serve: one queued by this process and not written yet
        (sound as it is), else the store's."""
        writer = self.writer
        if writer is not None:
            queued = writer.pending(digest)
            if queued is not None:
                return Lookup(Outcome.HIT, queued)
        return self.store.lookup(digest, serving=True)

    def _writer_of_run(self) -> WriteBehind | None:
        """The writer of the active run (made on first use), or None outside a run."""
        writer = self.writer
        if writer is None and self._active and WriteBehind.supports(self.store):
            with self._lock:
                if self._active and self.writer is None:
                    self.writer = WriteBehind(self.store)
                writer = self.writer
        return writer

    def put(self, entry: CacheEntry) -> None:
        """Write ``entry`` (behind, in a run)."""
        if not self.writes:
            return
        writer = self._writer_of_run()
        if writer is not None:
            writer.put(entry)
        else:
            self.store.put(entry)

    def record_hit(self, digest: str) -> None:
        """Count a hit of ``digest`` (behind, in a run)."""
        if not self.writes:
            return
        writer = self._writer_of_run()
        if writer is not None:
            writer.hit(digest)
        else:
            self.store.record_hit(digest)

    def coordinator(self) -> Coordinator | None:
        """The store's claims and aliases (None if its kind of store has none)."""
        if not self._coordination_checked:
            self._coordination_checked = True
            if self.connect():
                self._coordinator = coordinator_of(self.store)
            if self._coordinator is None and self._wanted():
                warn(
                    f"jobflow-cache: the cache store {self.store.name} cannot hold claims or run "
                    "folder records; JOBFLOW_CACHE_DEDUP and JOBFLOW_CACHE_EXCLUSIVE_DIRS have no "
                    "effect with it (use the embedded SQLite store, PostgreSQL or MongoDB)",
                    stacklevel=4,
                )
        if self._coordinator is None or self.writes:
            return self._coordinator
        return _ReadOnlyAliases(self._coordinator)

    # -- warnings ---------------------------------------------------------------------------
    def full_once(self) -> bool:
        """True the first time in a run a full file system is met (then it is warned about)."""
        if self._full_warned:
            return False
        self._full_warned = True
        return True


class _ReadOnlyAliases:
    """A coordinator whose aliases are read, never written (a session that writes nothing)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    def get_aliases(self, names: Sequence[str]) -> dict[str, str]:
        return self._coordinator.get_aliases(names)

    def set_aliases(self, pairs: Mapping[str, str]) -> None:
        return None

    def claim(self, name: str, owner: str, lease: float) -> str:  # never used: no dedup
        return owner

    def release(self, name: str, owner: str) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._coordinator, name)


def warn_not_cached(
    job: Job, err: BaseException | str, session: StoreSession | None = None
) -> None:
    """Warn that the result of ``job`` was not cached; a full file system once per run."""
    if session is not None and disk_full(err):  # once per run, not once per job
        if not session.full_once():
            logger.warning("result of job %r was not cached: %s", job.name, err)
            return
        warn(
            f"jobflow-cache: the cache's file system is full (job {job.name!r}: {err}); "
            "results are not cached while it is (said once per run)",
            stacklevel=3,
        )
        return
    warn(f"jobflow-cache: result of job {job.name!r} was not cached: {err}", stacklevel=3)


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_FULL_TEXTS = ("database or disk is full", "No space left on device", "Disk quota exceeded")


def disk_full(err: BaseException | str) -> bool:
    """Whether ``err`` (or an error it was raised from) says a file system is full.

    Examples
    --------
    >>> disk_full(OSError(errno.ENOSPC, "No space left on device")), disk_full("timeout")
    (True, False)
    """
    seen = 0
    cause: BaseException | str | None = err
    while cause is not None and seen < 8:
        if isinstance(cause, OSError) and cause.errno in _FULL_ERRNOS:
            return True
        if any(text in str(cause) for text in _FULL_TEXTS):
            return True
        if isinstance(cause, str):
            return False
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return False


class Held:
    """Entries of jobs running inside :class:`Accepting`, held until jobflow has stored
    their outputs, and what to do after (release a claim)."""

    __slots__ = ("after", "entries")

    def __init__(self) -> None:
        self.entries: list[tuple[StoreSession, Job, CacheEntry]] = []
        self.after: list[Callable[[], None]] = []


#: What the job running now holds back (inside :meth:`.Cache.accepting`), else None.
HELD: contextvars.ContextVar[Held | None] = contextvars.ContextVar(
    "jobflow_cache_held", default=None
)


class Accepting:
    """The context manager of :meth:`.Cache.accepting` (a class: it runs around every job):
    held entries are written when the block ends without an error, that is once jobflow has
    accepted the job's output; the claims are let go in any case."""

    __slots__ = ("_held", "_job", "_session", "_token")

    def __init__(self, session: StoreSession, job: Job) -> None:
        self._session, self._job = session, job

    def __enter__(self) -> None:
        self._held = Held()
        self._token = HELD.set(self._held)

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        held = self._held
        HELD.reset(self._token)
        try:
            if kind is None:  # jobflow accepted the output
                for session, recorded, entry in held.entries:
                    try:
                        session.put(entry)
                    except Exception as err:  # recording must never fail the job
                        warn_not_cached(recorded, err, session)
                if held.after and held.entries:
                    self._session.flush()  # in the store before the waiters are let go
            elif held.entries:
                logger.debug("%s failed after its function returned: not cached", self._job.name)
        finally:
            for callback in held.after:
                callback()
