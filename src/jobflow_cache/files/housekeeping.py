"""Housekeeping of an object area: pins, stale temporary files, setting objects aside.

Processes recording entries pin the objects they store (so a garbage collection keeps them);
killed ingests leave temporary files, removed once stale; a collection sets objects aside
before deleting them and puts back what turned out to be pinned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
from pathlib import Path

from jobflow_cache.files.fsops import (
    O_NOFOLLOW,
    O_NONBLOCK,
    TMP_PREFIX,
    host,
    tmp_base,
    tmp_name,
    unlink_quietly,
)
from jobflow_cache.files.layout import HEX_ID, AreaLayout

__all__ = [
    "GC_GRACE",
    "PIN_TTL",
    "STALE_AFTER",
    "STALE_DEAD_AFTER",
    "Housekeeping",
]

logger = logging.getLogger(__name__)

STALE_AFTER = 3600.0
"""Seconds after its last change (ctime) from which a temporary file in an object area is
stale: left by a process killed while it stored a file (see :meth:`.ObjectArea.remove_stale`)."""

STALE_DEAD_AFTER = 60.0
"""Seconds after its last write (mtime) from which a temporary file whose name carries this
host and the pid of a process that no longer exists is stale (removed at the start of the
next ingest; the margin covers a pid namespace the check cannot see into)."""

GC_GRACE = 3600.0
"""Seconds after it was stored (its ctime) during which an object is never deleted by a
garbage collection, referenced or not (``JOBFLOW_CACHE_GC_GRACE`` overrides it for gc and
purge)."""

PIN_TTL = 3600.0
"""Seconds a process's pin file (the objects it stored or reused for entries it is recording,
see :meth:`.ObjectArea.pinned`) protects them after its last write; a pin file of this host
whose process is gone protects nothing. A process starts a new pin file every half of this."""

_PINS = ".jfc-pins"
_PIN_NAME = re.compile(r"(\d+)-[0-9a-f]{32}-(.+)")
_PIN_FILES: dict[str, tuple[int, float, str]] = {}  # area root -> (pid, started, pin file)
_CLEANED: dict[str, float] = {}  # area root -> when this process last removed stale files
_CLEAN_EVERY = 600.0
_PIN_READ_MAX = 64 * 2**20  # bytes of one pin file read (two million objects)

_TMP_OWNER = re.compile(r"\.jfc-tmp-(\d+)-[0-9a-f]{32}-(.+)")


def _process_gone(pid: int) -> bool:
    """Whether no process ``pid`` exists on this host (as far as this pid namespace sees)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, another user's
        return False
    return False


class Housekeeping(AreaLayout):
    """Pins and stale temporary files of an object area (the part of :class:`.ObjectArea`
    that garbage collection relies on)."""

    def _clean_stale_now_and_then(self) -> None:
        """:meth:`remove_stale` at the first ingest of this process into the area, and then
        every :data:`_CLEAN_EVERY` seconds (a ``scandir`` of the area's root)."""
        key = os.fspath(self.root)
        now = time.monotonic()
        last = _CLEANED.get(key)
        if last is not None and now - last < _CLEAN_EVERY:
            return
        _CLEANED[key] = now
        try:
            count, size = self.remove_stale()
        except OSError as err:  # best effort: gc removes them too
            logger.debug("cannot clean stale temporary files of %s: %s", self.root, err)
            return
        if count:
            logger.info("removed %d stale temporary files (%d bytes) from %s", count, size, key)

    def _pin(self, xxh3: str) -> None:
        """Note in this process's pin file that an entry being recorded will reference the
        object ``xxh3`` (best effort: without it, :data:`GC_GRACE` still protects objects
        stored recently)."""
        key = os.fspath(self.root)
        now = time.time()
        held = _PIN_FILES.get(key)
        pid = os.getpid()
        try:
            if held is None or held[0] != pid or now - held[1] > PIN_TTL / 2:
                folder = self.root / _PINS
                folder.mkdir(exist_ok=True)
                held = (pid, now, os.fspath(folder / tmp_base()[len(TMP_PREFIX) :]))
                _PIN_FILES[key] = held
            fd = os.open(held[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT | O_NOFOLLOW, 0o644)
            try:
                os.write(fd, f"{xxh3}\n".encode())
            finally:
                os.close(fd)
        except OSError as err:
            logger.debug("cannot pin %s in %s: %s", xxh3, self.root, err)

    def pinned(self, *, clean: bool = True) -> set[str]:
        """The objects that processes recording entries pinned (:meth:`ingest` pins every
        object it stores or reuses): listed in a pin file written in the last
        :data:`PIN_TTL` seconds, unless that file's process (of this host) is gone. Pin
        files that protect nothing any more are removed. The pins of the calling process
        itself do not count (a process that records and then purges in turn). ``clean``
        False (a dry run) removes nothing."""
        ids: set[str] = set()
        now = time.time()
        try:
            with os.scandir(self.root / _PINS) as entries:
                items = list(entries)
        except (FileNotFoundError, NotADirectoryError):
            return ids
        for entry in items:
            match = _PIN_NAME.fullmatch(entry.name)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            pid = int(match.group(1)) if match is not None and match.group(2) == host() else 0
            if pid == os.getpid():
                continue  # this process's own: it records and collects in turn, not at once
            gone = pid > 0 and _process_gone(pid)
            if gone or now - st.st_mtime > PIN_TTL or not stat.S_ISREG(st.st_mode):
                if clean:
                    unlink_quietly(Path(entry.path))
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK)
                with open(fd, "rb") as stream:  # bounded: a pin file only keeps objects
                    text = stream.read(_PIN_READ_MAX).decode("ascii", "replace")
            except OSError:
                continue
            ids.update(line for line in text.split() if HEX_ID.fullmatch(line))
        return ids

    def set_aside(self, xxh3: str) -> Path | None:
        """Move the object ``xxh3`` to a temporary name in the area (a garbage collection's
        first step); None when it is not there."""
        aside = tmp_name(self.root)
        try:
            os.rename(self.path_of(xxh3), aside)
        except FileNotFoundError:
            return None
        return aside

    def put_back(self, xxh3: str, aside: Path) -> None:
        """Undo :meth:`set_aside` (no clobbering: an object stored again meanwhile stays)."""
        try:
            os.link(aside, self.path_of(xxh3), follow_symlinks=False)
        except FileExistsError:
            pass
        except FileNotFoundError:  # its fan-out folder went: make it again
            self.path_of(xxh3).parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path_of(xxh3), follow_symlinks=False)
        unlink_quietly(aside)

    def remove_stale(self, dry_run: bool = False) -> tuple[int, int]:
        """Delete the temporary files that processes killed while storing a file left in the
        area: untouched for :data:`STALE_AFTER` seconds (a file being stored is written to, or
        was linked, more recently), or named after a process of this host that is gone and
        not written to for :data:`STALE_DEAD_AFTER` seconds. Called at the start of the
        first ingest of every process (and every ten minutes), and by garbage collection.

        Returns
        -------
        tuple[int, int]
            How many there were and their size in bytes (a temporary hard link to a run
            folder's file frees nothing while that file exists).
        """
        count = size = 0
        cutoff = time.time() - STALE_AFTER
        try:
            with os.scandir(self.root) as entries:
                stale = [e for e in entries if e.name.startswith(TMP_PREFIX)]
        except FileNotFoundError:
            return 0, 0
        dead_cutoff = time.time() - STALE_DEAD_AFTER
        for entry in stale:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            owner = _TMP_OWNER.fullmatch(entry.name)
            dead = (
                owner is not None
                and owner.group(2) == host()
                and st.st_mtime < dead_cutoff
                and _process_gone(int(owner.group(1)))
            )
            if st.st_ctime > cutoff and not dead:
                continue
            if not dry_run:
                unlink_quietly(Path(entry.path))
            count += 1
            size += st.st_size if st.st_nlink <= 1 else 0
        return count, size
