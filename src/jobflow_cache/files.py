"""Run-folder manifests, content-addressed file objects, link/copy placement and verification."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Literal

import pydantic
import xxhash

from jobflow_cache.errors import CacheError, FilesUnavailableError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from io import FileIO

__all__ = [
    "CHUNK_SIZE",
    "FileRecord",
    "ObjectArea",
    "Snapshot",
    "changed_files",
    "snapshot",
]

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
"""Bytes read at a time when hashing or copying (1 MiB)."""

OBJECT_MODE = 0o444
"""Permission bits of every object in an :class:`ObjectArea` (read-only for everyone)."""

_NS = 1_000_000_000

_TMP_PREFIX = ".jfc-tmp-"

STALE_AFTER = 3600.0
"""Seconds after its last change (ctime) from which a temporary file in an object area is
stale: left by a process killed while it stored a file (see :meth:`ObjectArea.remove_stale`)."""
_O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_HEX_FANOUT = re.compile(r"[0-9a-f]{2}")
_HEX_REST = re.compile(r"[0-9a-f]{30}")

Snapshot = dict[str, tuple[int, int, int]]
"""Relative POSIX path -> ``(st_mtime_ns, st_size, st_ino)`` of every regular file of a folder."""

PlaceMode = Literal["link", "copy"]


class FileRecord(pydantic.BaseModel):
    """One file of a run folder, as kept in a cache entry's manifest.

    Attributes
    ----------
    path
        POSIX path relative to the run folder (never absolute, never containing ``..``).
    size
        Size of the content in bytes.
    xxh3
        ``xxh3_128`` hex digest of the content; this is the object id in an :class:`ObjectArea`.
    mode
        Permission bits of the original file (e.g. ``0o755`` for an executable script).
    """

    path: str
    size: int
    xxh3: str
    mode: int


# --------------------------------------------------------------------------- helpers


def _is_excluded(relpath: str, exclude: Sequence[str]) -> bool:
    """Whether a relative POSIX path or its basename matches one of the glob patterns."""
    return _excluder(tuple(exclude))(relpath)


@functools.lru_cache(maxsize=64)
def _excluder(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """:func:`_is_excluded` for fixed ``patterns``, with one compiled regex matching what any
    of them matches with ``fnmatchcase`` (a snapshot tests every file of a run folder)."""
    if not patterns:
        return lambda relpath: False
    match = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match

    def excluded(relpath: str) -> bool:
        if match(relpath) is not None:
            return True
        name = relpath.rpartition("/")[2]
        return name != relpath and match(name) is not None

    return excluded


def _clean_relpath(relpath: str) -> str:
    """Normalise a relative POSIX path; raise ``ValueError`` if absolute or escaping.

    ``"./a//b"`` becomes ``"a/b"``; ``""``, ``"."``, ``"/a"`` and anything with a ``..``
    component are refused.
    """
    pure = PurePosixPath(relpath)
    if not relpath or pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise ValueError(f"not a safe relative path: {relpath!r}")
    return pure.as_posix()


def _tmp_name(directory: Path) -> Path:
    """A fresh, unused-looking name for a temporary file in ``directory``."""
    return directory / f"{_TMP_PREFIX}{uuid.uuid4().hex}"


def _unlink_quietly(path: Path) -> None:
    """Remove ``path`` if it exists, ignoring a missing file."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _hash_stream(src: FileIO, dst: IO[bytes] | None = None) -> tuple[str, int]:
    """Hash a binary stream in :data:`CHUNK_SIZE` chunks, optionally copying it to ``dst``.

    Returns
    -------
    tuple[str, int]
        The ``xxh3_128`` hex digest and the number of bytes read.
    """
    hasher = xxhash.xxh3_128()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    size = 0
    while True:
        n = src.readinto(view)
        if not n:
            break
        chunk = view[:n]
        hasher.update(chunk)
        if dst is not None:
            dst.write(chunk)
        size += n
    return hasher.hexdigest(), size


def _hash_file(path: Path) -> tuple[str, int]:
    """``xxh3_128`` hex digest and size of a regular file (symlinks are not followed)."""
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW)
    with open(fd, "rb", buffering=0) as stream:
        return _hash_stream(stream)


def _safe_file(folder: Path, relpath: str) -> Path:
    """``folder / relpath`` after checking that no component below ``folder`` is a symlink.

    Raises
    ------
    ValueError
        If ``relpath`` is absolute or escapes ``folder``, or a component is a symlink or the
        file is not a regular file.
    """
    clean = _clean_relpath(relpath)
    current = Path(folder)
    parts = clean.split("/")
    for part in parts[:-1]:
        current = current / part
        st = os.lstat(current)
        if not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{current} is not a real directory (symlinks are not followed)")
    target = current / parts[-1]
    st = os.lstat(target)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{target} is not a regular file (symlinks are not followed)")
    return target


def _seal_of(xxh3: str) -> int:
    """The sub-second part (ns, never 0) of the mtime of a sealed object with digest ``xxh3``.

    A write sets an mtime of the current time, whose nanoseconds match it by chance once in
    a billion writes. A file system that keeps less than nanoseconds never keeps a seal: its
    objects are checked by their hash whenever they are used.
    """
    return 1 + int(xxh3[:8], 16) % (_NS - 1)


def _is_sealed(st: os.stat_result, xxh3: str, size: int) -> bool:
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


def _make_parents(dest: Path, relpath: str) -> Path:
    """Create the directories of ``relpath`` below ``dest``; refuse to walk through symlinks."""
    current = dest
    parts = relpath.split("/")
    for part in parts[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(current)
            st = os.lstat(current)
        if not stat.S_ISDIR(st.st_mode):
            raise FilesUnavailableError(
                f"cannot place {relpath!r}: {current} is not a real directory "
                "(symlinks are not followed)"
            )
    return current / parts[-1]


# --------------------------------------------------------------------------- snapshots


def snapshot(folder: str | os.PathLike[str], exclude: Sequence[str] = ()) -> Snapshot:
    """Record the state of the regular files below ``folder`` before a job runs.

    The walk is recursive; symlinks (to files or directories) are skipped and never followed.
    A missing ``folder`` gives an empty snapshot, since a job may create its own folder.

    Parameters
    ----------
    folder
        The run folder.
    exclude
        ``fnmatch`` glob patterns matched (case-sensitively) against both the relative POSIX
        path and the basename; a matching file is left out and a matching directory is not
        descended into.

    Returns
    -------
    Snapshot
        ``{relpath: (st_mtime_ns, st_size, st_ino)}``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = (Path(tmp) / "INCAR").write_text("ENCUT = 520")
    ...     _ = (Path(tmp) / "job.log").write_text("started")
    ...     sorted(snapshot(Path(tmp), exclude=["*.log"]))
    ['INCAR']
    """
    result: Snapshot = {}
    excluded = _excluder(tuple(exclude))
    pending: list[tuple[str, str]] = [(os.fspath(folder), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as entries:
                items = list(entries)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            if not prefix:
                raise
            continue
        except PermissionError:
            logger.warning("snapshot: cannot read directory %s, skipped", directory)
            continue
        for entry in items:
            relpath = prefix + entry.name
            try:
                # without following symlinks, a symlink is neither a dir nor a file: skipped
                if entry.is_dir(follow_symlinks=False):
                    if not excluded(relpath):
                        pending.append((entry.path, relpath + "/"))
                    continue
                if not entry.is_file(follow_symlinks=False) or excluded(relpath):
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # vanished during the walk
                continue
            result[relpath] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return result


def changed_files(
    folder: str | os.PathLike[str], before: Snapshot, exclude: Sequence[str] = ()
) -> list[str]:
    """List the files created or modified below ``folder`` since ``before`` was taken.

    A file counts as changed when it is new or its mtime, size or inode differ. When several
    jobs share one folder this yields only the files of the job that ran in between.

    Parameters
    ----------
    folder
        The run folder.
    before
        The :func:`snapshot` taken before the job ran.
    exclude
        Glob patterns, as for :func:`snapshot`.

    Returns
    -------
    list[str]
        Sorted relative POSIX paths.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     run = Path(tmp)
    ...     _ = (run / "INCAR").write_text("ENCUT = 520")
    ...     before = snapshot(run)
    ...     _ = (run / "OUTCAR").write_text("energy = -1.0")
    ...     changed_files(run, before)
    ['OUTCAR']
    """
    after = snapshot(folder, exclude)
    return sorted(path for path, state in after.items() if before.get(path) != state)


# --------------------------------------------------------------------------- object area


class ObjectArea:
    """Content-addressed store of file objects at ``<root>/<xx>/<rest-of-hex>``.

    Objects are named by the ``xxh3_128`` hex digest of their content, are read-only
    (``0o444``) and are stored once per content. Every write goes to a temporary name in the
    area and is published with a no-clobber hard link (or ``os.replace`` where the filesystem
    has no hard links), so concurrent threads or processes ingesting the same content are safe
    and no partial object ever appears under its final name. The root and its fan-out
    directories are created on demand.

    Every object is *sealed*: the sub-second part of its mtime is set to a value derived from
    its digest. A write into an object (by root, which ignores its read-only mode, or by an
    owner who made it writable, through any hard link to it, a run folder's included) sets
    its mtime to the current time and breaks the seal. A ``stat`` therefore tells an object
    that may be served from one that must be re-hashed first: an object whose seal is broken
    is served, and sealed again, only when its hash still matches; otherwise it is not
    served, and the next ingest of that content replaces it.

    Parameters
    ----------
    root
        Directory of the area.
    fsync
        Flush copied objects and placed copies to disk before publishing them.

    Examples
    --------
    >>> import shutil, tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> run = tmp / "run"
    >>> run.mkdir()
    >>> _ = (run / "OUTCAR").write_text("energy = -1.0")
    >>> area = ObjectArea(tmp / "objects")
    >>> records = area.record(run, ["OUTCAR"], mode="copy")
    >>> [(r.path, r.size) for r in records]
    [('OUTCAR', 13)]
    >>> placed = area.materialize(records, tmp / "new_run")
    >>> placed[0].read_text()
    'energy = -1.0'
    >>> shutil.rmtree(tmp)
    """

    def __init__(self, root: str | Path, *, fsync: bool = False) -> None:
        self.root: Path = Path(root)
        self.fsync = fsync

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
        if not isinstance(xxh3, str) or not _HEX_ID.fullmatch(xxh3):
            raise ValueError(f"not an xxh3_128 hex digest: {xxh3!r}")
        return self.root / xxh3[:2] / xxh3[2:]

    # ----------------------------------------------------------------- writing

    def ingest(self, src: str | os.PathLike[str], mode: PlaceMode = "link") -> str:
        """Store a file's content in the area and return its ``xxh3`` digest.

        Parameters
        ----------
        src
            A regular file; a symlink is refused, never followed.
        mode
            ``"link"``: hard-link ``src`` into the area (zero copy). The source then shares the
            object's inode and so also becomes read-only, which protects the object from
            in-place writes. Falls back to a copy when linking is impossible (other filesystem,
            ``EPERM``, ``EMLINK``, ...) or the inode cannot be made read-only.
            ``"copy"``: copy the bytes to a temporary file, then publish it.

        Returns
        -------
        str
            The ``xxh3_128`` hex digest of the bytes actually stored.

        Raises
        ------
        CacheError
            If ``src`` is not a regular file.
        OSError
            If reading ``src`` or writing the area fails.

        Notes
        -----
        If a sound object with the same content already exists it is left untouched (dedup);
        in link mode the source then keeps its own inode and permission bits. An existing
        object that was written to since it was stored (its seal is broken and its hash does
        not match), or that is not a regular file, is replaced. In link mode the seal changes
        the sub-second part of the source's mtime. A process still holding ``src`` open for
        writing can change a linked object after it was hashed; that breaks its seal.
        """
        return self._ingest(Path(src), mode)[0]

    def _ingest(self, src: Path, mode: PlaceMode) -> tuple[str, int]:
        """Implement :meth:`ingest`; also return the number of bytes stored."""
        if mode not in ("link", "copy"):
            raise ValueError(f"mode must be 'link' or 'copy', not {mode!r}")
        st = os.lstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise CacheError(f"{src} is not a regular file (symlinks are not followed)")
        self.root.mkdir(parents=True, exist_ok=True)
        if mode == "link":
            linked = self._ingest_link(src)
            if linked is not None:
                return linked
        return self._ingest_copy(src)

    def _ingest_link(self, src: Path) -> tuple[str, int] | None:
        """Hard-link ``src`` into the area; ``None`` when a copy is needed instead."""
        tmp = _tmp_name(self.root)
        try:
            os.link(src, tmp, follow_symlinks=False)
        except OSError as err:
            logger.debug("cannot hard-link %s into %s (%s); copying", src, self.root, err)
            return None
        try:
            before = os.lstat(tmp)
            if not stat.S_ISREG(before.st_mode):  # src swapped for a symlink meanwhile
                raise CacheError(f"{src} is not a regular file (symlinks are not followed)")
            if before.st_nlink > 2:
                # src shares its inode with other names (a file placed by a hit, or linked by
                # the job): sealing it would seal them too, maybe as an object of other content
                logger.debug("%s has other hard links; copying", src)
                return None
            digest, size = _hash_file(tmp)
            after = os.lstat(tmp)
            if (after.st_mtime_ns, after.st_size) != (before.st_mtime_ns, size):
                raise CacheError(f"{src} was written to while it was being recorded")
            final = self.path_of(digest)
            if self._reusable(final, digest, size):
                return digest, size
            try:
                os.chmod(tmp, OBJECT_MODE, follow_symlinks=False)
            except OSError as err:  # e.g. EPERM: the inode belongs to another user
                logger.debug("cannot make %s read-only (%s); copying", src, err)
                return None
            _seal(tmp, digest, after)
            self._publish(tmp, final)
            return digest, size
        finally:
            _unlink_quietly(tmp)

    def _ingest_copy(self, src: Path) -> tuple[str, int]:
        """Copy ``src`` into the area, hashing the bytes as they are written."""
        src_fd = os.open(src, os.O_RDONLY | _O_NOFOLLOW)
        with open(src_fd, "rb", buffering=0) as source:
            if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
                raise CacheError(f"{src} is not a regular file")
            tmp, digest, size = self._copy_hashed(source, self.root, OBJECT_MODE)
            try:
                final = self.path_of(digest)
                if not self._reusable(final, digest, size):
                    _seal(tmp, digest)
                    self._publish(tmp, final)
                return digest, size
            finally:
                _unlink_quietly(tmp)

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
        if _is_sealed(st, xxh3, size):
            return True
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        try:
            found = _hash_file(path)
        except OSError:
            return False
        if found != (xxh3, size):
            return False
        _seal(path, xxh3, st)
        return True

    def _discard(self, path: Path) -> None:
        """Remove a damaged object (a file or whatever took its name) from the area."""
        aside = _tmp_name(self.root)
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        logger.warning("object %s was damaged (written to, or replaced); removed", path)
        if os.path.isdir(aside) and not os.path.islink(aside):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            _unlink_quietly(aside)

    def _copy_hashed(self, source: FileIO, folder: Path, mode: int) -> tuple[Path, str, int]:
        """Copy ``source`` to a new temporary file in ``folder`` with ``mode``, hashing the
        bytes as they are written; return (temporary path, xxh3, size). The caller renames or
        removes the temporary file."""
        fd, name = tempfile.mkstemp(dir=folder, prefix=_TMP_PREFIX)
        tmp = Path(name)
        try:
            with open(fd, "wb") as out:
                digest, size = _hash_stream(source, out)
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
                os.fchmod(out.fileno(), mode)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tmp, digest, size

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

    def record(
        self, folder: Path, relpaths: Iterable[str], mode: PlaceMode = "link"
    ) -> list[FileRecord]:
        """Ingest files of a run folder and return their manifest.

        Parameters
        ----------
        folder
            The run folder.
        relpaths
            Relative POSIX paths below ``folder`` (e.g. from :func:`changed_files`); duplicates
            and spellings such as ``"./a"`` are normalised.
        mode
            As for :meth:`ingest`.

        Returns
        -------
        list[FileRecord]
            One record per file, sorted by path.

        Raises
        ------
        CacheError
            Chained to the cause if any file cannot be stored (absolute or escaping path, path
            through a symlink, not a regular file, I/O error). The caller then writes no cache
            entry; objects already stored are left for garbage collection.
        """
        records: dict[str, FileRecord] = {}
        for relpath in relpaths:
            try:
                clean = _clean_relpath(relpath)
                if clean in records:
                    continue
                path = _safe_file(folder, clean)
                file_mode = stat.S_IMODE(os.lstat(path).st_mode) & 0o777
                digest, size = self._ingest(path, mode)
            except (OSError, ValueError, CacheError) as err:
                raise CacheError(f"cannot record {relpath!r} of {folder}: {err}") from err
            records[clean] = FileRecord(path=clean, size=size, xxh3=digest, mode=file_mode)
        return [records[key] for key in sorted(records)]

    # ----------------------------------------------------------------- reading

    def _usable(self, record: FileRecord) -> bool:
        """Whether the object of ``record`` exists and holds its content (see :meth:`_sound`)."""
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
        """
        return all(self._usable(record) for record in records)

    def materialize(
        self, records: Sequence[FileRecord], dest: Path, mode: PlaceMode = "link"
    ) -> list[Path]:
        """Place the objects of a manifest into a run folder.

        Parameters
        ----------
        records
            The manifest.
        dest
            The new run folder; created if needed. Directories below it are created, but an
            existing symlink below it is never walked through.
        mode
            ``"link"``: hard-link each object, so the placed file shares the object's inode and
            is read-only like it (an in-place write cannot corrupt the cache). Where linking is
            impossible (other filesystem, ``EPERM``, ``EMLINK``, ...) a copy is placed instead,
            with the recorded permission bits, since a copy cannot harm the cache.
            ``"copy"``: a writable copy with the recorded permission bits; the bytes are checked
            against the recorded size and digest while copying.

        Returns
        -------
        list[Path]
            The placed files, in the order of ``records``.

        Raises
        ------
        FilesUnavailableError
            Before anything is written, if a record's path is absolute or escapes ``dest``, or
            if objects are missing or corrupt: no longer holding their content (the message
            names their paths). Later, chained to the cause, if placing a file fails or a
            copied object does not match its record; files placed before that stay in place.

        Notes
        -----
        An existing file at a destination is replaced atomically (temporary name beside it,
        then ``os.replace``).
        """
        if mode not in ("link", "copy"):
            raise ValueError(f"mode must be 'link' or 'copy', not {mode!r}")
        cleaned: list[str] = []
        for record in records:
            try:
                cleaned.append(_clean_relpath(record.path))
            except ValueError as err:
                raise FilesUnavailableError(
                    f"refusing to materialize {record.path!r}: absolute or outside {dest}"
                ) from err
        missing = [record.path for record in records if not self._usable(record)]
        if missing:
            raise FilesUnavailableError(
                f"{len(missing)} of {len(records)} objects missing or corrupt in {self.root}: "
                + ", ".join(missing)
            )
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        placed: list[Path] = []
        for record, relpath in zip(records, cleaned):
            try:
                target = _make_parents(dest, relpath)
                if mode == "copy" or not self._place_link(record, target):
                    self._place_copy(record, target)
            except OSError as err:
                raise FilesUnavailableError(
                    f"cannot place {record.path!r} in {dest}: {err}"
                ) from err
            placed.append(target)
        return placed

    def _place_link(self, record: FileRecord, target: Path) -> bool:
        """Hard-link the object to ``target``; ``False`` when a copy is needed instead."""
        tmp = _tmp_name(target.parent)
        try:
            try:
                os.link(self.path_of(record.xxh3), tmp, follow_symlinks=False)
            except OSError as err:
                logger.debug("cannot hard-link %s to %s (%s); copying", record.xxh3, target, err)
                return False
            os.replace(tmp, target)
            return True
        finally:
            # rename() is a no-op when target already is the same inode: drop the extra name
            _unlink_quietly(tmp)

    def _place_copy(self, record: FileRecord, target: Path) -> None:
        """Copy the object to ``target`` with the recorded mode, checking size and digest."""
        src_fd = os.open(self.path_of(record.xxh3), os.O_RDONLY | _O_NOFOLLOW)
        with open(src_fd, "rb", buffering=0) as source:
            tmp, digest, size = self._copy_hashed(source, target.parent, record.mode & 0o777)
            try:
                if size != record.size or digest != record.xxh3:
                    raise FilesUnavailableError(
                        f"object {record.xxh3} for {record.path!r} is corrupt "
                        f"(size {size}, xxh3 {digest})"
                    )
                os.replace(tmp, target)
            finally:
                _unlink_quietly(tmp)

    def verify(self, record: FileRecord) -> str | None:
        """Check one object against its record by re-hashing it.

        Returns
        -------
        str or None
            ``None`` if the object exists with the recorded size and digest, otherwise a short
            problem: ``"invalid xxh3"``, ``"missing"``, ``"not a regular file"``,
            ``"size <actual> != <recorded>"`` or ``"xxh3 mismatch"``.
        """
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
            digest, size = _hash_file(path)
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
                    if _HEX_FANOUT.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
                )
        except FileNotFoundError:
            return
        for fanout in fanouts:
            try:
                with os.scandir(self.root / fanout) as entries:
                    items = sorted(
                        (entry for entry in entries if _HEX_REST.fullmatch(entry.name)),
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

    def remove_stale(self, dry_run: bool = False) -> tuple[int, int]:
        """Delete the temporary files that processes killed while storing a file left in the
        area (untouched for :data:`STALE_AFTER` seconds: a file being stored is written to, or
        was linked, more recently).

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
                stale = [e for e in entries if e.name.startswith(_TMP_PREFIX)]
        except FileNotFoundError:
            return 0, 0
        for entry in stale:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_ctime > cutoff or stat.S_ISDIR(st.st_mode):
                continue
            if not dry_run:
                _unlink_quietly(Path(entry.path))
            count += 1
            size += st.st_size if st.st_nlink <= 1 else 0
        return count, size

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
