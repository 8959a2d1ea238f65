"""Run-folder snapshots and change records, content-addressed file objects, and serving them.

Recording a job compares a :func:`snapshot` of its run folder taken before it ran with one
taken after, and keeps, for every path the job created, modified or deleted, the state it
found ("before": absent, a file of known size and, when cheaply known, content digest, a
symlink, a folder) and the state it left ("after": a file, a symlink with its target text, an
empty folder, or deleted); see :class:`FileRecord`. Serving (:meth:`ObjectArea.materialize`)
checks the whole folder against those records before changing anything: a path is changed
only where it still holds the recorded "before" state (or already holds the "after" state);
anything else raises :class:`~jobflow_cache.errors.FolderConflictError`, and the job runs.

The object area never shares an inode with a folder a user or job can write (except with the
opt-in ``link`` placement of large files, see :data:`LINK_MIN_SIZE`): files are stored and
served as reflinks (copy-on-write clones) where the file system has them, copies elsewhere.
"""

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
from types import SimpleNamespace
from typing import IO, TYPE_CHECKING, Any, Literal

import pydantic
import xxhash

from jobflow_cache.errors import CacheError, FilesUnavailableError, FolderConflictError

try:  # reflinks (FICLONE); not on every platform
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from io import FileIO

__all__ = [
    "CHUNK_SIZE",
    "LINK_MIN_SIZE",
    "LIVE_FILE_PATTERNS",
    "FileRecord",
    "FileState",
    "ObjectArea",
    "Snapshot",
    "changed_files",
    "changed_paths",
    "differences",
    "file_digest",
    "known_digest",
    "prehash",
    "remember",
    "snapshot",
]

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
"""Bytes read at a time when hashing or copying (1 MiB)."""

OBJECT_MODE = 0o444
"""Permission bits of every object in an :class:`ObjectArea` (read-only for everyone)."""

LINK_MIN_SIZE = 64 * 2**20
"""With ``JOBFLOW_CACHE_FILES=link`` (opt-in), files of at least this many bytes are served as
read-only hard links to their object instead of copies, where the file system has no reflinks
and the process does not run as root (read-only bits do not stop root). Such a file cannot be
written in place by a later job (``PermissionError``, as for any read-only file); replacing it
(write a new file, rename over it) works. Every object's seal is checked before each hit."""

LIVE_FILE_PATTERNS = (
    "*-wal",
    "*-shm",
    "*-journal",
    "*.lock",
    "*.lck",
    ".nfs*",
    "*.pid",
)
"""Names of files that belong to a live process rather than to a job: SQLite's write-ahead
log, shared memory and rollback journal of any database, lock files, NFS's silly-renamed
open files. Never recorded, whatever ``FILES_EXCLUDE`` says; a database file whose ``-wal``,
``-shm`` or ``-journal`` exists after the job is not recorded either (someone has it open)."""

_SQLITE_SIDECARS = ("-wal", "-shm", "-journal")

_NS = 1_000_000_000

_TMP_PREFIX = ".jfc-tmp-"

STALE_AFTER = 3600.0
"""Seconds after its last change (ctime) from which a temporary file in an object area is
stale: left by a process killed while it stored a file (see :meth:`ObjectArea.remove_stale`)."""
_O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_HEX_FANOUT = re.compile(r"[0-9a-f]{2}")
_HEX_REST = re.compile(r"[0-9a-f]{30}")
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)

#: Kinds of snapshot entries (last item of a :data:`Snapshot` value).
_REG, _LNK, _DIR = 0, 1, 2

PlaceMode = Literal["link", "copy"]


class Snapshot(dict[str, tuple[int, int, int, int, int]]):
    """Relative POSIX path -> ``(st_mtime_ns, st_size, st_ino, st_ctime_ns, kind)`` of every
    regular file, symlink and folder below a run folder (``kind``: 0 file, 1 symlink, 2
    folder). ``dev`` is the folder's device and ``targets`` the symlinks' target texts."""

    def __init__(self, *args: Any, dev: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dev = dev
        self.targets: dict[str, str] = {}


class FileState(pydantic.BaseModel):
    """What a path held before a job ran (see :attr:`FileRecord.before`).

    Attributes
    ----------
    kind
        ``"file"``, ``"symlink"`` or ``"dir"``.
    size
        Size of a file in bytes.
    xxh3
        ``xxh3_128`` of a file's content, ``""`` when it was not known cheaply (the content
        was never hashed in this process): a folder holding a file there is then never
        served into.
    target
        A symlink's target text.
    """

    kind: Literal["file", "symlink", "dir"] = "file"
    size: int = 0
    xxh3: str = ""
    target: str = ""


class FileRecord(pydantic.BaseModel):
    """One path of a run folder the job changed, as kept in a cache entry's manifest.

    Attributes
    ----------
    path
        POSIX path relative to the run folder (never absolute, never containing ``..``).
    size
        Size of the content in bytes (files).
    xxh3
        ``xxh3_128`` hex digest of the content (files); the object id in an
        :class:`ObjectArea` when ``stored``.
    mode
        Permission bits of the file (e.g. ``0o755`` for an executable script).
    kind
        What the job left: ``"file"``, ``"symlink"``, ``"dir"`` (an empty folder it made) or
        ``"deleted"``.
    target
        A symlink's target text, exactly as the job wrote it (relative or absolute; never
        followed).
    stored
        False for a file the cache did not keep (``MAX_FILE_SIZE``, ``FILES=none``): a hit
        copies it from the recording run's folder when it is still there unchanged (same
        size and digest), and otherwise runs the job.
    before
        What the path held when the job started: ``None`` when it did not exist.
    """

    path: str
    size: int = 0
    xxh3: str = ""
    mode: int = 0
    kind: Literal["file", "symlink", "dir", "deleted"] = "file"
    target: str = ""
    stored: bool = True
    before: FileState | None = None

    @property
    def has_object(self) -> bool:
        """Whether the record's content is an object of the area."""
        return self.kind == "file" and self.stored


# --------------------------------------------------------------------------- digest memo

_MEMO: dict[tuple[int, int, int, int, int], str] = {}
_MEMO_MAX = 500_000


def _memo_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def known_digest(st: os.stat_result) -> str | None:
    """The content digest of the regular file whose ``lstat`` is ``st``, when this process
    hashed, stored or placed that file since it last changed (device, inode, size, mtime and
    ctime all equal), or :mod:`jobflow_cache.contents`' memo knows it (a file named in the
    inputs, a large file hashed by another process of this host); otherwise None. Never reads
    the file."""
    digest = _MEMO.get(_memo_key(st))
    if digest is None:
        contents = _contents_module()
        if contents is not None:
            try:
                digest = contents.memo().get(st)
            except Exception:  # an optional shortcut: unknown
                digest = None
    return digest if isinstance(digest, str) else None


def remember(path: str | os.PathLike[str], st: os.stat_result, xxh3: str) -> None:
    """Remember that the file ``path`` whose ``lstat`` is ``st`` holds content ``xxh3`` (see
    :func:`known_digest`); also tells :mod:`jobflow_cache.contents` when it is there."""
    if len(_MEMO) >= _MEMO_MAX:
        _MEMO.clear()
    _MEMO[_memo_key(st)] = xxh3
    contents = _contents_module()
    if contents is not None:
        with contextlib.suppress(Exception):
            contents.remember(os.fspath(path), st, xxh3)


@functools.cache
def _contents_module() -> Any:
    try:
        from jobflow_cache import contents  # a later layer, optional
    except ImportError:
        return None
    usable = callable(getattr(contents, "remember", None)) and callable(
        getattr(contents, "memo", None)
    )
    return contents if usable else None


def file_digest(path: str | os.PathLike[str], st: os.stat_result | None = None) -> str | None:
    """The ``xxh3_128`` of the regular file ``path`` now (its ``lstat`` is ``st`` if known):
    from the memo when it is unchanged since it was last hashed, else by reading it. None
    when it is no regular file, vanished, or was written to while it was read."""
    try:
        st = st or os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        known = known_digest(st)
        if known is not None:
            return known
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW)
        with open(fd, "rb", buffering=0) as stream:
            first = os.fstat(stream.fileno())
            if _memo_key(first) != _memo_key(st):
                return None
            digest, size = _hash_stream(stream)
            after = os.fstat(stream.fileno())
    except OSError:
        return None
    if size != st.st_size or _memo_key(after) != _memo_key(st):
        return None
    remember(path, st, digest)
    return digest


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


def _may_link() -> bool:
    """Whether served files may be read-only hard links: never as root, whom read-only bits
    do not stop (a write through the link would change the object and every folder sharing
    it)."""
    geteuid = getattr(os, "geteuid", None)
    return geteuid is None or geteuid() != 0


def _readlink(path: Path, st: os.stat_result | None) -> str:
    if st is None or not stat.S_ISLNK(st.st_mode):
        return ""
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _parent_problem(dest: Path, relpath: str, seen: dict[str, str]) -> str | None:
    """Why the folders of ``relpath`` below ``dest`` cannot hold it (a component is a file
    or a symlink), or None (they are real folders, or absent and made when placing)."""
    prefix = ""
    for part in relpath.split("/")[:-1]:
        prefix = f"{prefix}/{part}" if prefix else part
        state = seen.get(prefix)
        if state is None:
            st = _lstat(dest / prefix)
            if st is None:
                state = "absent"
            elif stat.S_ISDIR(st.st_mode):
                state = "dir"
            else:
                found = _describe(st, _readlink(dest / prefix, st))
                state = f"{prefix!r} is {found}, not a folder"
            seen[prefix] = state
        if state == "absent":
            return None
        if state != "dir":
            return state
    return None


def _moved_links(record: FileRecord, old: str, new: str) -> FileRecord:
    """``record`` with absolute symlink targets inside the recording folder ``old`` moved to
    the served folder ``new``, as the job would have written them there."""

    def moved(target: str) -> str | None:
        prefix = old.rstrip("/")
        if old == new or not prefix or not (target == prefix or target.startswith(prefix + "/")):
            return None
        return new.rstrip("/") + target[len(prefix) :]

    update: dict[str, Any] = {}
    if record.kind == "symlink" and (target := moved(record.target)) is not None:
        update["target"] = target
    before = record.before
    if before is not None and before.kind == "symlink" and (found := moved(before.target)):
        update["before"] = before.model_copy(update={"target": found})
    return record.model_copy(update=update) if update else record


def _holds_after(target: Path, current: os.stat_result | None, record: FileRecord) -> bool:
    """Whether ``target`` already is in the state the recorded job left it in."""
    if record.kind == "deleted":
        return current is None
    if current is None:
        return False
    if record.kind == "dir":
        return stat.S_ISDIR(current.st_mode)
    if record.kind == "symlink":
        return stat.S_ISLNK(current.st_mode) and _readlink(target, current) == record.target
    return (
        stat.S_ISREG(current.st_mode)
        and current.st_size == record.size
        and file_digest(target, current) == record.xxh3
    )


def differences(folder: str | os.PathLike[str], records: Iterable[FileRecord]) -> list[str]:
    """The paths of a manifest that ``folder`` does not hold as the recorded job left them
    (content, symlink target, empty folder, deletion); an empty list when it still holds
    everything the job wrote. Files are compared by size, then by digest (the memo answers
    for files stored, placed or hashed in this process since they last changed). Paths the
    job did not touch are not looked at."""
    folder = Path(folder)
    differ = []
    for record in records:
        try:
            target = folder / _clean_relpath(record.path)
            same = _parent_problem(folder, record.path, {}) is None and _holds_after(
                target, _lstat(target), record
            )
        except (OSError, ValueError):
            same = False
        if not same:
            differ.append(record.path)
    return differ


def _holds_before(
    target: Path,
    current: os.stat_result | None,
    before: FileState | None,
    relpath: str,
    deleted: set[str],
) -> bool:
    """Whether ``target`` is in the state the recorded job found (a folder: empty once the
    paths the job deleted in it are gone)."""
    if before is None:
        return current is None
    if current is None:
        return False
    if before.kind == "symlink":
        return stat.S_ISLNK(current.st_mode) and _readlink(target, current) == before.target
    if before.kind == "dir":
        if not stat.S_ISDIR(current.st_mode):
            return False
        try:
            names = os.listdir(target)
        except OSError:
            return False
        return all(f"{relpath}/{name}" in deleted for name in names)
    return (
        bool(before.xxh3)
        and stat.S_ISREG(current.st_mode)
        and current.st_size == before.size
        and file_digest(target, current) == before.xxh3
    )


def _source_of(
    record: FileRecord, relpath: str, source_dir: str | os.PathLike[str] | None
) -> tuple[Path, os.stat_result] | None:
    """The file of the recording run's folder holding the content of ``record`` (not stored
    in the cache), with its ``lstat``; None when it is gone or changed."""
    if not source_dir:
        return None
    try:
        path = _safe_file(Path(source_dir), relpath)
        st = os.lstat(path)
    except (OSError, ValueError):
        return None
    if st.st_size != record.size or file_digest(path, st) != record.xxh3:
        return None
    return path, st


# --------------------------------------------------------------------------- snapshots


def snapshot(folder: str | os.PathLike[str], exclude: Sequence[str] = ()) -> Snapshot:
    """Record the state of the files, symlinks and folders below ``folder`` before a job runs.

    The walk is recursive; symlinks (to files or directories) are listed as symlinks (their
    target text is kept in ``targets``) and never followed. Other special files (sockets,
    fifos) are left out. A missing ``folder`` gives an empty snapshot, since a job may create
    its own folder. Nothing is read: one ``stat`` per entry (and a ``readlink`` per symlink).

    Parameters
    ----------
    folder
        The run folder.
    exclude
        ``fnmatch`` glob patterns matched (case-sensitively) against both the relative POSIX
        path and the basename; a matching file is left out and a matching directory is
        neither listed nor descended into.

    Returns
    -------
    Snapshot
        ``{relpath: (st_mtime_ns, st_size, st_ino, st_ctime_ns, kind)}``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = (Path(tmp) / "INCAR").write_text("ENCUT = 520")
    ...     _ = (Path(tmp) / "job.log").write_text("started")
    ...     sorted(snapshot(Path(tmp), exclude=["*.log"]))
    ['INCAR']
    """
    result = Snapshot()
    excluded = _excluder(tuple(exclude))
    pending: list[tuple[str, str]] = [(os.fspath(folder), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as entries:
                items = list(entries)
        except FileNotFoundError:  # the run folder itself: an empty snapshot
            continue
        except NotADirectoryError:
            if not prefix:
                raise
            continue
        except PermissionError:
            logger.warning("snapshot: cannot read directory %s, skipped", directory)
            continue
        if not prefix and items:  # the device of the files' memo keys (none: not needed)
            try:
                result.dev = os.stat(directory).st_dev
            except FileNotFoundError:  # gone since it was listed
                return Snapshot()
        for entry in items:
            relpath = prefix + entry.name
            try:
                if excluded(relpath):
                    continue
                st = entry.stat(follow_symlinks=False)
                fmt = stat.S_IFMT(st.st_mode)
                if fmt == stat.S_IFDIR:
                    kind = _DIR
                    pending.append((entry.path, relpath + "/"))
                elif fmt == stat.S_IFREG:
                    kind = _REG
                elif fmt == stat.S_IFLNK:
                    kind = _LNK
                    result.targets[relpath] = os.readlink(entry.path)
                else:
                    continue
            except FileNotFoundError:  # vanished during the walk
                continue
            result[relpath] = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns, kind)
    return result


PREHASH_MAX_FILE = 256 * 1024
"""Files up to this size whose digest is not known are hashed before a job (:func:`prehash`)."""

PREHASH_BUDGET = 16 * 2**20
"""Bytes :func:`prehash` reads at most before one job (files already known cost nothing)."""

_RACY_NS = 2_000_000_000


def prehash(
    folder: str | os.PathLike[str],
    snap: Snapshot,
    max_file: int = PREHASH_MAX_FILE,
    budget: int = PREHASH_BUDGET,
) -> int:
    """Hash the small files of a snapshot whose content digest is not known yet, so that the
    "before" state of a file the job then changes is known (a hit can be served into a folder
    holding that content, instead of running the job). Bounded: files of at most
    ``max_file`` bytes, ``budget`` bytes in all; files changed in the last two seconds are
    left out (a write within the same time stamp tick could go unseen). Files this process
    stored, placed or hashed before are known already and cost nothing, so in a steady shared
    folder only the files other programs wrote are read. Returns the bytes read."""
    folder = os.fspath(folder)
    read = 0
    now = time.time_ns()
    for relpath, (mtime, size, ino, ctime, kind) in snap.items():
        if kind != _REG or size > max_file or now - max(mtime, ctime) < _RACY_NS:
            continue
        then = SimpleNamespace(
            st_dev=snap.dev, st_ino=ino, st_size=size, st_mtime_ns=mtime, st_ctime_ns=ctime
        )
        if known_digest(then) is not None:  # type: ignore[arg-type]
            continue
        if read + size > budget:
            break
        path = os.path.join(folder, relpath)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if _memo_key(st) != (snap.dev, ino, size, mtime, ctime):
            continue
        file_digest(path, st)
        read += size
    return read


def changed_paths(before: Snapshot, after: Snapshot) -> list[str]:
    """Sorted paths created, modified, replaced or deleted between two snapshots.

    A folder counts only when it appeared or disappeared (its mtime changes with every file
    made in it).
    """
    changed = []
    for path in before.keys() | after.keys():
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        if old is not None and new is not None and old[4] == new[4] == _DIR:
            continue
        changed.append(path)
    return sorted(changed)


def changed_files(
    folder: str | os.PathLike[str], before: Snapshot, exclude: Sequence[str] = ()
) -> list[str]:
    """List the regular files created or modified below ``folder`` since ``before`` was taken.

    A file counts as changed when it is new or its mtime, size, ctime or inode differ. When
    several jobs share one folder this yields only the files of the job that ran in between
    (and of other processes that wrote there meanwhile). :func:`changed_paths` also lists
    symlinks, folders and deletions.

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
    return sorted(
        path for path, state in after.items() if state[4] == _REG and before.get(path) != state
    )


def _live_database(folder: Path, relpath: str) -> bool:
    """Whether ``relpath`` is an SQLite database someone has open: its ``-wal``, ``-shm`` or
    ``-journal`` exists."""
    return any(os.path.lexists(folder / (relpath + suffix)) for suffix in _SQLITE_SIDECARS)


def _describe(st: os.stat_result | None, target: str = "") -> str:
    if st is None:
        return "nothing"
    if stat.S_ISLNK(st.st_mode):
        return f"a symlink to {target!r}" if target else "a symlink"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if stat.S_ISREG(st.st_mode):
        return f"a file of {st.st_size} bytes"
    return "a special file"


def _describe_state(state: FileState | None) -> str:
    if state is None:
        return "nothing"
    if state.kind == "symlink":
        return f"a symlink to {state.target!r}"
    if state.kind == "dir":
        return "an empty folder"
    known = "" if state.xxh3 else ", content not known"
    return f"a file of {state.size} bytes{known}"


def _describe_after(record: FileRecord) -> str:
    if record.kind == "deleted":
        return "deleted it"
    if record.kind == "symlink":
        return f"left a symlink to {record.target!r}"
    if record.kind == "dir":
        return "left an empty folder"
    return f"left a file of {record.size} bytes"


_CLONELESS: set[int] = set()  # devices whose file system has no reflinks


def _may_clone(fd: int) -> bool:
    """Whether a reflink into the file ``fd`` is worth trying (not known to fail there)."""
    return fcntl is not None and os.fstat(fd).st_dev not in _CLONELESS


def _no_clone(fd: int, err: OSError) -> None:
    """Remember a file system without reflinks (not a one-off failure: across devices)."""
    if err.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
        _CLONELESS.add(os.fstat(fd).st_dev)


def _clone_or_copy(src_fd: int, dst_fd: int) -> str:
    """Copy the whole of ``src_fd`` to the empty ``dst_fd``: a reflink (FICLONE) where the
    file system shares blocks, ``copy_file_range`` (in the kernel) elsewhere, read/write as a
    last resort. Returns how: ``"reflink"``, ``"kernel"`` or ``"read"``."""
    if _may_clone(dst_fd):
        try:
            fcntl.ioctl(dst_fd, _FICLONE, src_fd)
            return "reflink"
        except OSError as err:
            _no_clone(dst_fd, err)
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is not None:
        try:
            while copy_range(src_fd, dst_fd, 1 << 30):
                pass
            return "kernel"
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            os.lseek(src_fd, 0, os.SEEK_SET)
            os.ftruncate(dst_fd, 0)
            os.lseek(dst_fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(src_fd, CHUNK_SIZE)
        if not chunk:
            return "read"
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view) :]


def _same_state(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_mode) == (
        b.st_ino,
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
        b.st_mode,
    )


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- object area


class ObjectArea:
    """Content-addressed store of file objects at ``<root>/<xx>/<rest-of-hex>``.

    Objects are named by the ``xxh3_128`` hex digest of their content, are read-only
    (``0o444``) and are stored once per content. Every write goes to a temporary name in the
    area and is published with a no-clobber hard link (or ``os.replace`` where the filesystem
    has no hard links), so concurrent threads or processes ingesting the same content are safe
    and no partial object ever appears under its final name. The root and its fan-out
    directories are created on demand.

    An object never shares its inode with a run folder's file: files are stored as reflinks
    (copy-on-write clones) where the file system has them and as copies elsewhere, and served
    the same way; only the opt-in ``link`` placement hard-links large objects
    (:data:`LINK_MIN_SIZE`) into a run folder, read-only, and never as root.

    Every object is *sealed*: the sub-second part of its mtime is set to a value derived from
    its digest. A write into an object (by root, which ignores its read-only mode, or by an
    owner who made it writable) sets its mtime to the current time and breaks the seal. A
    ``stat`` therefore tells an object that may be served from one that must be re-hashed
    first: an object whose seal is broken is served, and sealed again, only when its hash
    still matches; otherwise it is not served, and the next ingest of that content replaces
    it.

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
    >>> records = area.record(run, ["OUTCAR"])
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
        try:
            src_fd = os.open(src, os.O_RDONLY | _O_NOFOLLOW)
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
                if size != first.st_size or _memo_key(last) != _memo_key(first):
                    raise CacheError(f"{src} was written to while it was being recorded")
                final = self.path_of(digest)
                if not self._reusable(final, digest, size):
                    _seal(tmp, digest)
                    self._publish(tmp, final)
            finally:
                _unlink_quietly(tmp)
        remember(src, first, digest)
        return digest, size, first

    def _store_temp(self, source: FileIO) -> tuple[Path, str, int]:
        """A read-only temporary copy of ``source`` in the area (a reflink where possible),
        with its digest and size."""
        fd, name = tempfile.mkstemp(dir=self.root, prefix=_TMP_PREFIX)
        tmp = Path(name)
        try:
            with open(fd, "w+b", buffering=0) as out:
                # a reflink, or a copy in the kernel; then the stored bytes are hashed (one
                # read from the page cache), so the digest is that of what was stored
                _clone_or_copy(source.fileno(), out.fileno())
                out.seek(0)
                digest, size = _hash_stream(out)
                if self.fsync:
                    os.fsync(out.fileno())
                os.fchmod(out.fileno(), OBJECT_MODE)
        except BaseException:
            _unlink_quietly(tmp)
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
        self, folder: Path, relpaths: Iterable[str], mode: PlaceMode = "copy"
    ) -> list[FileRecord]:
        """Ingest regular files of a run folder and return their manifest (each recorded as
        created by the job: ``before`` is None). :meth:`record_changes` records everything a
        job changed, with the states it found.

        Parameters
        ----------
        folder
            The run folder.
        relpaths
            Relative POSIX paths below ``folder``; duplicates and spellings such as ``"./a"``
            are normalised.
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
                records[clean] = self._file_record(folder, clean, None, store=True)
            except (OSError, ValueError, CacheError) as err:
                raise CacheError(f"cannot record {relpath!r} of {folder}: {err}") from err
        return [records[key] for key in sorted(records)]

    def _file_record(
        self, folder: Path, clean: str, before: FileState | None, *, store: bool
    ) -> FileRecord:
        """The record of the regular file ``clean`` below ``folder``: stored in the area, or
        (``store`` False) only hashed."""
        path = _safe_file(folder, clean)
        if store:
            digest, size, st = self._ingest(path)
        else:
            st = os.lstat(path)
            found = file_digest(path, st)
            if found is None:
                raise CacheError(f"{path} was written to while it was being recorded")
            digest, size = found, st.st_size
        return FileRecord(
            path=clean,
            size=size,
            xxh3=digest,
            mode=stat.S_IMODE(st.st_mode) & 0o7777,
            stored=store,
            before=before,
        )

    def record_changes(
        self,
        folder: str | os.PathLike[str],
        before: Snapshot,
        after: Snapshot,
        *,
        max_size: int = 0,
        store: bool = True,
    ) -> list[FileRecord]:
        """Record what a job changed in its run folder, between two :func:`snapshot`\\ s.

        Every path created, modified, replaced or deleted gets one :class:`FileRecord` with
        the state the job left and the state it found (``before``; a file's digest only when
        :func:`known_digest` knows it, i.e. this process stored, placed or hashed it since
        it last changed). Files are stored in the area (reflink or copy); a folder counts
        only when the job made it and left it empty, or deleted it.

        Parameters
        ----------
        folder
            The run folder.
        before, after
            Snapshots taken before and after the job ran, with the same exclude patterns.
        max_size
            Files larger than this many bytes are hashed but not stored (0: no limit).
        store
            False: no file is stored, all are only hashed (``FILES=none``).

        Raises
        ------
        CacheError
            Chained to the cause when a path cannot be recorded (written to meanwhile, I/O
            error); the caller then writes no entry.

        Notes
        -----
        A file that matches :data:`LIVE_FILE_PATTERNS`, or an SQLite database whose ``-wal``,
        ``-shm`` or ``-journal`` exists, is left out: it belongs to a live process.
        """
        changed = changed_paths(before, after)
        if not changed:  # the job changed nothing (most jobs of a shared folder)
            return []
        folder = Path(folder)
        live = _excluder(LIVE_FILE_PATTERNS)
        occupied: set[str] = set()
        for path in after:
            parent = path.rpartition("/")[0]
            while parent and parent not in occupied:
                occupied.add(parent)
                parent = parent.rpartition("/")[0]
        records: list[FileRecord] = []
        for path in changed:
            old, new = before.get(path), after.get(path)
            if live(path):
                continue
            try:
                state = self._before_state(before, path, old)
                if new is None:
                    records.append(FileRecord(path=path, kind="deleted", before=state))
                elif new[4] == _DIR:
                    if path not in occupied:
                        records.append(FileRecord(path=path, kind="dir", mode=0, before=state))
                elif new[4] == _LNK:
                    target = os.readlink(folder / path)
                    records.append(
                        FileRecord(path=path, kind="symlink", target=target, before=state)
                    )
                else:
                    if _live_database(folder, path):
                        logger.debug("%s is an open SQLite database: not recorded", path)
                        continue
                    keep = store and not (max_size and new[1] > max_size)
                    records.append(self._file_record(folder, path, state, store=keep))
            except FileNotFoundError:  # gone since the snapshot: no longer the job's to serve
                if new is not None and old is None:
                    continue
                raise CacheError(f"cannot record {path!r} of {folder}: it vanished") from None
            except (OSError, ValueError, CacheError) as err:
                raise CacheError(f"cannot record {path!r} of {folder}: {err}") from err
        return records

    @staticmethod
    def _before_state(
        before: Snapshot, path: str, old: tuple[int, int, int, int, int] | None
    ) -> FileState | None:
        if old is None:
            return None
        mtime, size, ino, ctime, kind = old
        if kind == _DIR:
            return FileState(kind="dir")
        if kind == _LNK:
            return FileState(kind="symlink", target=before.targets.get(path, ""))
        then = SimpleNamespace(
            st_dev=before.dev, st_ino=ino, st_size=size, st_mtime_ns=mtime, st_ctime_ns=ctime
        )
        return FileState(kind="file", size=size, xxh3=known_digest(then) or "")  # type: ignore[arg-type]

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

    def materialize(
        self,
        records: Sequence[FileRecord],
        dest: Path,
        mode: PlaceMode = "copy",
        *,
        source_dir: str | os.PathLike[str] | None = None,
    ) -> list[Path]:
        """Apply a manifest to a run folder: what the recorded job did, where it is safe.

        First the whole folder is checked, and nothing is changed unless every path is
        either already in the state the job left, or still in the state the job found
        (``before``): then files are placed, symlinks made, empty folders created and
        deleted paths removed. A path holding anything else (a file another job of this run
        wrote, content that is not known to be the one the recorded job found) means the
        job would have acted on other input, or that serving would destroy or hide work:
        :class:`~jobflow_cache.errors.FolderConflictError` names it, and the caller runs the
        job.

        Parameters
        ----------
        records
            The manifest.
        dest
            The new run folder; created if needed. Directories below it are created, but an
            existing symlink below it is never walked through.
        mode
            ``"copy"``: every file is an independent, writable copy with the recorded
            permission bits (a reflink where the file system has them).
            ``"link"``: the same, except that files of at least :data:`LINK_MIN_SIZE` bytes
            are hard links to their read-only object, where possible and not as root.
        source_dir
            The recording run's folder: files the cache did not store (``stored`` False) are
            copied from there, when they still hold the recorded content.

        Returns
        -------
        list[Path]
            The paths of the records, in the order of ``records``.

        Raises
        ------
        FilesUnavailableError
            Before anything is written, if a record's path is absolute or escapes ``dest``,
            or objects are missing or corrupt (the message names their paths). Later,
            chained to the cause, if placing a file fails.
        FolderConflictError
            Before anything is written, when ``dest`` disagrees with the records, or a file
            that was not stored cannot be taken from ``source_dir``; later, when a path
            changes while the folder is being served.
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
        if source_dir is not None:
            records = [_moved_links(r, os.fspath(source_dir), os.fspath(dest)) for r in records]
        steps = self._plan(records, cleaned, dest, source_dir)
        dest.mkdir(parents=True, exist_ok=True)
        link = mode == "link" and _may_link()
        # deletions first (deepest folders last), then folders, files and symlinks
        order = sorted(
            range(len(steps)),
            key=lambda i: (
                {"delete": 0, "rmdir": 1}.get(steps[i][1], 2),
                -cleaned[i].count("/") if steps[i][1] == "rmdir" else 0,
                cleaned[i],
            ),
        )
        for i in order:
            record, action, current, source = steps[i]
            if action == "keep":
                continue
            target = dest / cleaned[i]
            try:
                self._apply(record, action, target, current, source, link, dest, cleaned[i])
            except (FolderConflictError, FilesUnavailableError):
                raise
            except OSError as err:
                raise FilesUnavailableError(
                    f"cannot place {record.path!r} in {dest}: {err}"
                ) from err
        return [dest / relpath for relpath in cleaned]

    def _plan(
        self,
        records: Sequence[FileRecord],
        cleaned: Sequence[str],
        dest: Path,
        source_dir: str | os.PathLike[str] | None,
    ) -> list[tuple[FileRecord, str, os.stat_result | None, tuple[Path, os.stat_result] | None]]:
        """What :meth:`materialize` does for each record (``keep``, ``delete``, ``rmdir``,
        ``mkdir``, ``symlink``, ``file``), with the ``lstat`` of the path it checked and the
        source of a file that was not stored; raises when the folder disagrees."""
        conflicts: list[str] = []
        steps: list[
            tuple[FileRecord, str, os.stat_result | None, tuple[Path, os.stat_result] | None]
        ] = []
        deleted = {c for r, c in zip(records, cleaned) if r.kind == "deleted"}
        parents: dict[str, str] = {}
        for record, relpath in zip(records, cleaned):
            problem = _parent_problem(dest, relpath, parents)
            if problem is not None:
                conflicts.append(f"{relpath!r}: {problem}")
                continue
            target = dest / relpath
            current = _lstat(target)
            if _holds_after(target, current, record):
                steps.append((record, "keep", current, None))
                continue
            if not _holds_before(target, current, record.before, relpath, deleted):
                found = _describe(current, _readlink(target, current))
                conflicts.append(
                    f"{relpath!r} holds {found}, where the recorded job found "
                    f"{_describe_state(record.before)} and {_describe_after(record)}"
                )
                continue
            source = None
            if record.kind == "deleted":
                action = (
                    "rmdir" if current is not None and stat.S_ISDIR(current.st_mode) else "delete"
                )
            elif record.kind == "dir":
                action = "mkdir"
            elif record.kind == "symlink":
                action = "symlink"
            else:
                action = "file"
                if not record.stored:
                    source = _source_of(record, relpath, source_dir)
                    if source is None:
                        conflicts.append(
                            f"{relpath!r} was not stored in the cache (FILES=none or "
                            f"MAX_FILE_SIZE) and the recording run's folder {source_dir} no "
                            "longer holds it unchanged"
                        )
                        continue
            steps.append((record, action, current, source))
        if conflicts:
            more = f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""
            raise FolderConflictError(
                f"the run folder {dest} does not hold what the recorded job found: "
                + "; ".join(conflicts[:3])
                + more
            )
        return steps

    def _apply(
        self,
        record: FileRecord,
        action: str,
        target: Path,
        current: os.stat_result | None,
        source: tuple[Path, os.stat_result] | None,
        link: bool,
        dest: Path,
        relpath: str,
    ) -> None:
        """Carry out one step of :meth:`materialize`, checking first that ``target`` is still
        as it was when the folder was checked."""

        def unchanged() -> None:
            if not _same_state(_lstat(target), current):
                raise FolderConflictError(
                    f"{relpath!r} in {dest} changed while the cached result was served"
                )

        if action == "delete":
            unchanged()
            _unlink_quietly(target)
            return
        if action == "rmdir":
            try:
                os.rmdir(target)
            except FileNotFoundError:
                pass
            except OSError as err:
                raise FolderConflictError(
                    f"{relpath!r} in {dest} is not empty, as it was for the recorded job"
                ) from err
            return
        _make_parents(dest, relpath)
        if action == "mkdir":
            with contextlib.suppress(FileExistsError):
                os.mkdir(target)
            return
        if action == "symlink":
            tmp = _tmp_name(target.parent)
            os.symlink(record.target, tmp)
            self._swap(tmp, target, current, unchanged)
            return
        tmp = self._placed_temp(record, target.parent, link, source)
        self._swap(tmp, target, current, unchanged)
        with contextlib.suppress(OSError):
            remember(target, os.lstat(target), record.xxh3)

    @staticmethod
    def _swap(
        tmp: Path, target: Path, current: os.stat_result | None, unchanged: Callable[[], None]
    ) -> None:
        """Rename ``tmp`` over ``target`` (an empty folder there is removed first)."""
        try:
            unchanged()
            if current is not None and stat.S_ISDIR(current.st_mode):
                os.rmdir(target)
            os.replace(tmp, target)
        finally:
            _unlink_quietly(tmp)

    def _placed_temp(
        self,
        record: FileRecord,
        folder: Path,
        link: bool,
        source: tuple[Path, os.stat_result] | None,
    ) -> Path:
        """A temporary file in ``folder`` with the content of ``record``: a hard link to its
        object (``link`` and large), else a reflink or a copy of its object, or of
        ``source`` (checked unchanged after copying) for a file that was not stored."""
        if source is None and link and record.size >= LINK_MIN_SIZE:
            tmp = _tmp_name(folder)
            try:
                os.link(self.path_of(record.xxh3), tmp, follow_symlinks=False)
                return tmp
            except OSError as err:
                logger.debug("cannot hard-link %s (%s); copying", record.xxh3, err)
        src_path = self.path_of(record.xxh3) if source is None else source[0]
        src_fd = os.open(src_path, os.O_RDONLY | _O_NOFOLLOW)
        fd, name = tempfile.mkstemp(dir=folder, prefix=_TMP_PREFIX)
        tmp = Path(name)
        try:
            try:
                _clone_or_copy(src_fd, fd)
                if self.fsync:
                    os.fsync(fd)
                os.fchmod(fd, (record.mode & 0o7777) or 0o644)
                size = os.fstat(fd).st_size
                if source is not None and _memo_key(os.fstat(src_fd)) != _memo_key(source[1]):
                    raise FolderConflictError(
                        f"{src_path} changed while it was copied for {record.path!r}"
                    )
            finally:
                os.close(fd)
                os.close(src_fd)
            if size != record.size:
                raise FilesUnavailableError(
                    f"object {record.xxh3} for {record.path!r} is corrupt (size {size})"
                )
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tmp

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
