"""The objects themselves: ingest, seal, publish, check, list and remove.

A file is stored by its content digest: a temporary copy (a reflink where possible) hashed
from the stored bytes, sealed, then published under its final name without clobbering.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from jobflow_cache.errors import CacheError
from jobflow_cache.files.digests import MEMO, hash_file, hash_stream, memo_key, remember
from jobflow_cache.files.fsops import (
    O_NOFOLLOW,
    clone_or_copy,
    lstat_or_none,
    tmp_name,
    unlink_quietly,
)
from jobflow_cache.files.housekeeping import Housekeeping
from jobflow_cache.files.layout import HEX_FANOUT, HEX_REST, PlaceMode
from jobflow_cache.files.manifest import FileRecord

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from io import FileIO

__all__ = [
    "OBJECT_MODE",
    "ObjectStorage",
    "is_sealed",
]

logger = logging.getLogger(__name__)

OBJECT_MODE = 0o444
"""Permission bits of every object in an :class:`.ObjectArea` (read-only for everyone)."""

_NS = 1_000_000_000


def _seal_of(xxh3: str) -> int:
    """The sub-second part (ns, never 0) of the mtime of a sealed object with digest ``xxh3``.

    A write sets an mtime of the current time, whose nanoseconds match it by chance once in
    a billion writes. A file system that keeps less than nanoseconds never keeps a seal: its
    objects are checked by their hash whenever they are used.
    """
    return 1 + int(xxh3[:8], 16) % (_NS - 1)


def is_sealed(st: os.stat_result, xxh3: str, size: int) -> bool:
    """Whether ``st`` is that of a regular file of ``size`` bytes still bearing the seal of
    ``xxh3`` (no write since it was sealed: a write sets the mtime to the current time)."""
    return (
        stat.S_ISREG(st.st_mode) and st.st_size == size and st.st_mtime_ns % _NS == _seal_of(xxh3)
    )


def _seal(path: Path, xxh3: str, st: os.stat_result | None = None) -> None:
    """Set the sub-second part of ``path``'s mtime to the seal of ``xxh3`` (its whole seconds
    are kept; ``st`` is its ``lstat`` if known). Best effort: a file system without
    sub-second times, or a file of another user, stays unsealed, and is then checked by its
    hash when used."""
    try:
        st = st or os.lstat(path)
        mtime = st.st_mtime_ns - st.st_mtime_ns % _NS + _seal_of(xxh3)
        os.utime(path, ns=(st.st_atime_ns, mtime), follow_symlinks=False)
    except OSError as err:
        logger.debug("cannot seal %s (%s); it is checked by its hash when used", path, err)


class ObjectStorage(Housekeeping):
    """Ingest, check, list and remove the objects of an area (the part of
    :class:`.ObjectArea` every other part builds on)."""

    # ----------------------------------------------------------------- writing

    def ingest(self, src: str | os.PathLike[str], mode: PlaceMode = "copy") -> str:
        """Store a file's content in the area and return its ``xxh3`` digest.

        The source is cloned (reflink) where the file system can, copied otherwise; it is
        never hard-linked, and its content, mode and times are never changed.

        Parameters
        ----------
        src
            A regular file; a symlink is refused, never followed.
        mode
            Accepted for compatibility; both ``"link"`` and ``"copy"`` store an independent
            object.

        Returns
        -------
        str
            The ``xxh3_128`` hex digest of the bytes actually stored.

        Raises
        ------
        CacheError
            If ``src`` is not a regular file, or was written to while it was stored.
        OSError
            If reading ``src`` or writing the area fails.

        Notes
        -----
        If a sound object with the same content already exists it is left untouched (dedup).
        An existing object that was written to since it was stored (its seal is broken and
        its hash does not match), or that is not a regular file, is replaced.
        """
        if mode not in ("link", "copy"):
            raise ValueError(f"mode must be 'link' or 'copy', not {mode!r}")
        return self._ingest(Path(src))[0]

    def _ingest(self, src: Path) -> tuple[str, int, os.stat_result]:
        """Implement :meth:`ingest`; also return the size and the source's ``stat`` (it held
        the stored content at that ``stat``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_stale_now_and_then()
        try:
            src_fd = os.open(src, os.O_RDONLY | O_NOFOLLOW)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise CacheError(
                    f"{src} is not a regular file (symlinks are not followed)"
                ) from err
            raise
        with open(src_fd, "rb", buffering=0) as source:
            first = os.fstat(source.fileno())
            if not stat.S_ISREG(first.st_mode):
                raise CacheError(f"{src} is not a regular file (symlinks are not followed)")
            tmp, digest, size = self._store_temp(source)
            try:
                last = os.fstat(source.fileno())
                if size != first.st_size or memo_key(last) != memo_key(first):
                    raise CacheError(f"{src} was written to while it was being recorded")
                final = self.path_of(digest)
                # pinned before it is looked at: a collection that sets the object aside
                # after this look reads the pin and puts it back (see purge.collect_garbage)
                self._pin(digest)
                stored = None
                if not self._reusable(final, digest, size):
                    _seal(tmp, digest)
                    stored = os.lstat(tmp).st_ino
                    self._publish(tmp, final)
            finally:
                unlink_quietly(tmp)
        remember(src, first, digest)
        if stored is not None:  # the object is the file this process just wrote and hashed
            with contextlib.suppress(OSError):
                st = os.lstat(final)
                if st.st_ino == stored:
                    MEMO[memo_key(st)] = digest  # in process only: a hit need not read it
        return digest, size, first

    def _store_temp(self, source: FileIO) -> tuple[Path, str, int]:
        """A read-only temporary copy of ``source`` in the area (a reflink where possible),
        with its digest and size."""
        tmp = tmp_name(self.root)  # names this process and host (see remove_stale)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o600)
        try:
            with open(fd, "w+b", buffering=0) as out:
                # a reflink, or a copy in the kernel; then the stored bytes are hashed (one
                # read from the page cache), so the digest is that of what was stored
                clone_or_copy(source.fileno(), out.fileno())
                out.seek(0)
                digest, size = hash_stream(out)
                if self.fsync:
                    os.fsync(out.fileno())
                os.fchmod(out.fileno(), OBJECT_MODE)
        except BaseException:
            unlink_quietly(tmp)
            raise
        return tmp, digest, size

    def _reusable(self, final: Path, xxh3: str, size: int) -> bool:
        """Whether an object already stored at ``final`` holds the content ``xxh3`` (then it is
        reused). An object that does not is moved out of the way, so the new one replaces it."""
        try:
            st = os.lstat(final)
        except FileNotFoundError:
            return False
        if self._sound(final, st, xxh3, size):
            return True
        self._discard(final)
        return False

    def _sound(self, path: Path, st: os.stat_result, xxh3: str, size: int) -> bool:
        """Whether the object at ``path`` (its ``lstat`` is ``st``) holds the content ``xxh3``
        of ``size`` bytes: a ``stat`` when its seal is intact, its hash otherwise (an intact
        object is then sealed again)."""
        if is_sealed(st, xxh3, size):
            return True
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        try:
            found = hash_file(path)
        except OSError:
            return False
        if found != (xxh3, size):
            return False
        _seal(path, xxh3, st)
        return True

    def _discard(self, path: Path, identity: tuple[int, int] | None = None) -> None:
        """Remove a damaged object (a file or whatever took its name) from the area; with
        ``identity`` (device, inode), only if the name still holds that file (a sound object
        stored meanwhile stays)."""
        aside = tmp_name(self.root)
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        except OSError as err:  # not ours to move (a read-only area): never served anyway
            logger.warning("object %s is damaged and cannot be removed: %s", path, err)
            return
        if identity is not None:
            st = lstat_or_none(aside)
            if st is not None and (st.st_dev, st.st_ino) != identity:
                with contextlib.suppress(OSError):
                    os.link(aside, path, follow_symlinks=False)  # put back what replaced it
                unlink_quietly(aside)
                return
        logger.warning("object %s was damaged (written to, or replaced); removed", path)
        if os.path.isdir(aside) and not os.path.islink(aside):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            unlink_quietly(aside)

    def _publish(self, tmp: Path, final: Path) -> None:
        """Give the finished temporary file ``tmp`` its final name without clobbering.

        The caller removes ``tmp`` afterwards.
        """
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(tmp, final, follow_symlinks=False)
        except FileExistsError:
            return  # someone else stored the same content first
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                raise
            # filesystem without hard links: replacing equal content is harmless
            os.replace(tmp, final)

    # ----------------------------------------------------------------- reading

    def _usable(self, record: FileRecord) -> bool:
        """Whether the object of ``record`` exists and holds its content (see :meth:`_sound`);
        True for a record without an object."""
        if not record.has_object:
            return True
        try:
            path = self.path_of(record.xxh3)
            st = os.lstat(path)
        except (OSError, ValueError):
            return False
        return self._sound(path, st, record.xxh3, record.size)

    def has_all(self, records: Iterable[FileRecord]) -> bool:
        """Whether every object exists and holds its recorded content.

        A ``stat`` each for sealed objects; an object whose seal is broken (written to, or
        stored before seals existed) is re-hashed, and sealed again when it still matches.
        Records without an object (symlinks, folders, deletions, files not stored) count as
        present: :meth:`materialize` checks those.
        """
        return all(self._usable(record) for record in records)

    def verify(self, record: FileRecord) -> str | None:
        """Check one object against its record by re-hashing it.

        Returns
        -------
        str or None
            ``None`` if the object exists with the recorded size and digest (or the record
            has no object: a symlink, folder, deletion or a file not stored), otherwise a
            short problem: ``"invalid xxh3"``, ``"missing"``, ``"not a regular file"``,
            ``"size <actual> != <recorded>"`` or ``"xxh3 mismatch"``.
        """
        if not record.has_object:
            return None
        try:
            path = self.path_of(record.xxh3)
        except ValueError:
            return "invalid xxh3"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return "missing"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size != record.size:
            return f"size {st.st_size} != {record.size}"
        try:
            digest, size = hash_file(path)
        except FileNotFoundError:
            return "missing"
        if size != record.size:
            return f"size {size} != {record.size}"
        if digest != record.xxh3:
            return "xxh3 mismatch"
        return None

    def iter_objects(self) -> Iterator[tuple[str, int]]:
        """Yield ``(xxh3, size)`` of every object, in digest order.

        Temporary files and anything not named like an object are skipped.
        """
        try:
            with os.scandir(self.root) as top:
                fanouts = sorted(
                    entry.name
                    for entry in top
                    if HEX_FANOUT.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
                )
        except FileNotFoundError:
            return
        for fanout in fanouts:
            try:
                with os.scandir(self.root / fanout) as entries:
                    items = sorted(
                        (entry for entry in entries if HEX_REST.fullmatch(entry.name)),
                        key=lambda entry: entry.name,
                    )
                    found = []
                    for entry in items:
                        try:
                            if entry.is_file(follow_symlinks=False):
                                size = entry.stat(follow_symlinks=False).st_size
                                found.append((fanout + entry.name, size))
                        except FileNotFoundError:
                            continue
            except FileNotFoundError:
                continue
            yield from found

    def remove(self, xxh3: str) -> int:
        """Delete one object.

        Returns
        -------
        int
            The object's size in bytes, or 0 if it was absent. Disk space is only released
            once no run folder holds a hard link to the same inode any more.
        """
        path = self.path_of(xxh3)
        try:
            size = os.lstat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return 0
        return size
