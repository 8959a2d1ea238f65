"""Run-folder snapshots and change records, content-addressed file objects, and serving them.

What a record holds, and the check of a manifest read from a store, are in
:mod:`.files.manifest`.

Recording a job compares a :func:`snapshot` of its run folder taken before it ran with one
taken after, and keeps, for every path the job created, modified or deleted, the state it
found ("before": absent, a file of known size and, when cheaply known, content digest, a
symlink, a folder) and the state it left ("after": a file, a symlink with its target text, an
empty folder, or deleted); see :class:`.FileRecord`. Serving (:meth:`ObjectArea.materialize`)
checks the whole folder against those records before changing anything: a path is changed
only where it still holds the recorded "before" state (or already holds the "after" state);
anything else raises :class:`~jobflow_cache.errors.FolderConflictError`, and the job runs.

The object area never shares an inode with a folder a user or job can write (except with the
opt-in ``link`` placement of large files, see :data:`LINK_MIN_SIZE`): files are stored and
served as reflinks (copy-on-write clones) where the file system has them, copies elsewhere.

A manifest read from a store is untrusted (:func:`.check_manifest`): it can only create,
below the run folder, the paths the recorded job changed, walked without following symlinks,
never through or over something that appeared meanwhile, and never code or hidden files
(:data:`.CODE_FILE_PATTERNS`) unless ``SERVE_CODE_FILES``. Every object is verified by its
content before a hit places it (:meth:`ObjectArea.materialize`). Garbage collection keeps
objects stored recently (:data:`GC_GRACE`) and objects pinned by processes recording
entries (:meth:`ObjectArea.pinned`).
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
import socket
import stat
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import IO, TYPE_CHECKING, Any, Literal

import xxhash

from jobflow_cache.errors import (
    CacheError,
    FilesUnavailableError,
    FolderConflictError,
    UnsafeManifestError,
)
from jobflow_cache.files.manifest import (
    FileRecord,
    FileState,
    check_manifest,
    clean_relpath,
    is_code_path,
)

try:  # reflinks (FICLONE); not on every platform
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from io import FileIO

__all__ = [
    "CHUNK_SIZE",
    "GC_GRACE",
    "LINK_MIN_SIZE",
    "LIVE_FILE_PATTERNS",
    "PIN_TTL",
    "STALE_DEAD_AFTER",
    "VERIFY_FILES_LIMIT",
    "ObjectArea",
    "PlaceMode",
    "Snapshot",
    "changed_files",
    "changed_paths",
    "differences",
    "excluder",
    "file_digest",
    "hash_stream",
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
and the process does not run as root (read-only bits do not stop root), and the object belongs
to this user (another user could write into it after it is served). Such a file cannot be
written in place by a later job (``PermissionError``, as for any read-only file); replacing it
(write a new file, rename over it) works. Every object is verified by its content before it is
linked, as before it is copied (see :meth:`ObjectArea.materialize`)."""

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
see :meth:`ObjectArea.pinned`) protects them after its last write; a pin file of this host
whose process is gone protects nothing. A process starts a new pin file every half of this."""

VERIFY_FILES_LIMIT = 1 << 30
"""Default size (bytes) up to which a hit verifies each file object by its content."""

_O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY: int = getattr(os, "O_DIRECTORY", 0)
_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in is never waited on
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


# --------------------------------------------------------------------------- digest memo

_MEMO: dict[tuple[int, int, int, int, int], str] = {}
_MEMO_MAX = 500_000


def _memo_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def known_digest(st: os.stat_result) -> str | None:
    """The content digest of the regular file whose ``lstat`` is ``st``, when this process
    hashed, stored or placed that file since it last changed (device, inode, size, mtime and
    ctime all equal), or :mod:`jobflow_cache.hashing.contents`' memo knows it (a file named in the
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
    :func:`known_digest`); also tells :mod:`jobflow_cache.hashing.contents` when it is there."""
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
        from jobflow_cache.hashing import contents  # a later layer, optional
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
            digest, size = hash_stream(stream)
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
    return excluder(tuple(exclude))(relpath)


@functools.lru_cache(maxsize=64)
def excluder(patterns: tuple[str, ...]) -> Callable[[str], bool]:
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


@functools.cache
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def _bytecode_cache(relpath: str) -> bool:
    """Whether ``relpath`` is in a ``__pycache__`` folder: Python's byte code of a module a
    job imported, never recorded (Python writes it again; a hit never serves one)."""
    return "__pycache__" in relpath.split("/")


def _tmp_base() -> str:
    """A fresh temporary name: ``.jfc-tmp-<pid>-<random>-<host>`` (the pid and host tell a
    later ingest whether the process that made it is gone, see :meth:`ObjectArea.remove_stale`)."""
    return f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}-{_host()}"


_PINS = ".jfc-pins"
_PIN_NAME = re.compile(r"(\d+)-[0-9a-f]{32}-(.+)")
_PIN_FILES: dict[str, tuple[int, float, str]] = {}  # area root -> (pid, started, pin file)
_CLEANED: dict[str, float] = {}  # area root -> when this process last removed stale files
_CLEAN_EVERY = 600.0
_PIN_READ_MAX = 64 * 2**20  # bytes of one pin file read (two million objects)

_TMP_OWNER = re.compile(r"\.jfc-tmp-(\d+)-[0-9a-f]{32}-(.+)")


def _tmp_name(directory: Path) -> Path:
    """A fresh, unused-looking name for a temporary file in ``directory``."""
    return directory / _tmp_base()


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


def _unlink_quietly(path: Path) -> None:
    """Remove ``path`` if it exists, ignoring a missing file."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def hash_stream(src: FileIO, dst: IO[bytes] | None = None) -> tuple[str, int]:
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
        return hash_stream(stream)


def _safe_file(folder: Path, relpath: str) -> Path:
    """``folder / relpath`` after checking that no component below ``folder`` is a symlink.

    Raises
    ------
    ValueError
        If ``relpath`` is absolute or escapes ``folder``, or a component is a symlink or the
        file is not a regular file.
    """
    clean = clean_relpath(relpath)
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
            target = folder / clean_relpath(record.path)
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
    excluded = excluder(tuple(exclude))
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


class _Verified:
    """The state (:func:`_memo_key`) and owner of an object when a hit checked it."""

    __slots__ = ("key", "uid")

    def __init__(self, key: tuple[int, int, int, int, int], uid: int) -> None:
        self.key = key
        self.uid = uid


def _euid() -> int:
    geteuid = getattr(os, "geteuid", None)
    return geteuid() if geteuid is not None else -1


def _lstat_at(name: str, parent: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=parent)
    except FileNotFoundError:
        return None


def _open_parent(dest_fd: int, relpath: str, *, create: bool) -> int:
    """A descriptor of the folder holding ``relpath`` below the folder ``dest_fd``, walked
    one component at a time without following symlinks (``ELOOP``/``ENOTDIR`` where one is a
    symlink or a file); missing folders are made when ``create``."""
    fd = os.dup(dest_fd)
    try:
        for part in relpath.split("/")[:-1]:
            try:
                below = os.open(part, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
                below = os.open(part, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


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
    ``stat`` therefore tells an object that may be reused by an ingest from one that must be
    re-hashed first. A hit does not rely on the seal (a ``utime`` restores it): it verifies
    each object by its content, memoised on (device, inode, size, mtime, ctime), which no
    ``utime``, ``cp -p`` or ``rsync -a`` can set back; above ``verify_limit`` bytes the seal
    (or the memo) is the cheaper check. A damaged object is removed, never served, and the
    next ingest of that content stores it again.

    Parameters
    ----------
    root
        Directory of the area.
    fsync
        Flush copied objects and placed copies to disk before publishing them.
    verify_limit
        Objects up to this many bytes are verified by content before a hit places them
        (``VERIFY_FILES_LIMIT``; 0: all of them).
    serve_code
        ``SERVE_CODE_FILES``: record and serve code files, hidden files and symlinks out of
        the run folder (see :func:`check_manifest`).

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
        self._clean_stale_now_and_then()
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
                # pinned before it is looked at: a collection that sets the object aside
                # after this look reads the pin and puts it back (see purge.collect_garbage)
                self._pin(digest)
                stored = None
                if not self._reusable(final, digest, size):
                    _seal(tmp, digest)
                    stored = os.lstat(tmp).st_ino
                    self._publish(tmp, final)
            finally:
                _unlink_quietly(tmp)
        remember(src, first, digest)
        if stored is not None:  # the object is the file this process just wrote and hashed
            with contextlib.suppress(OSError):
                st = os.lstat(final)
                if st.st_ino == stored:
                    _MEMO[_memo_key(st)] = digest  # in process only: a hit need not read it
        return digest, size, first

    def _store_temp(self, source: FileIO) -> tuple[Path, str, int]:
        """A read-only temporary copy of ``source`` in the area (a reflink where possible),
        with its digest and size."""
        tmp = _tmp_name(self.root)  # names this process and host (see remove_stale)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600)
        try:
            with open(fd, "w+b", buffering=0) as out:
                # a reflink, or a copy in the kernel; then the stored bytes are hashed (one
                # read from the page cache), so the digest is that of what was stored
                _clone_or_copy(source.fileno(), out.fileno())
                out.seek(0)
                digest, size = hash_stream(out)
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

    def _discard(self, path: Path, identity: tuple[int, int] | None = None) -> None:
        """Remove a damaged object (a file or whatever took its name) from the area; with
        ``identity`` (device, inode), only if the name still holds that file (a sound object
        stored meanwhile stays)."""
        aside = _tmp_name(self.root)
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        except OSError as err:  # not ours to move (a read-only area): never served anyway
            logger.warning("object %s is damaged and cannot be removed: %s", path, err)
            return
        if identity is not None:
            st = _lstat(aside)
            if st is not None and (st.st_dev, st.st_ino) != identity:
                with contextlib.suppress(OSError):
                    os.link(aside, path, follow_symlinks=False)  # put back what replaced it
                _unlink_quietly(aside)
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
                clean = clean_relpath(relpath)
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
        serve_code: bool | None = None,
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
        serve_code
            ``SERVE_CODE_FILES`` (default: the area's own): whether files matching
            :data:`CODE_FILE_PATTERNS` and
            symlinks out of the folder may be recorded. Off, a job that changed such a path
            is not recorded at all (``CacheError``, before anything is stored): a hit never
            serves them, and an entry without them would be a wrong result.

        Raises
        ------
        CacheError
            Chained to the cause when a path cannot be recorded (written to meanwhile, I/O
            error); the caller then writes no entry.

        Notes
        -----
        A file that matches :data:`LIVE_FILE_PATTERNS`, or an SQLite database whose ``-wal``,
        ``-shm`` or ``-journal`` exists, is left out: it belongs to a live process. So is
        anything in a ``__pycache__`` folder (byte code Python wrote for an import).
        """
        changed = changed_paths(before, after)
        if not changed:  # the job changed nothing (most jobs of a shared folder)
            return []
        folder = Path(folder)
        if serve_code is None:
            serve_code = self.serve_code
        live = excluder(LIVE_FILE_PATTERNS)

        def skipped(path: str) -> bool:  # a live process's, byte code, the cache's own
            name = path.rpartition("/")[2]
            return live(path) or _bytecode_cache(path) or name.startswith(_TMP_PREFIX)

        if not serve_code:
            code = [p for p in changed if is_code_path(p) and not skipped(p)]
            if code:
                raise CacheError(
                    f"the job changed {len(code)} file(s) Python would import or hidden files "
                    f"({', '.join(code[:3])}), which a hit never serves while "
                    "JOBFLOW_CACHE_SERVE_CODE_FILES is off"
                )
        occupied: set[str] = set()
        for path in after:
            parent = path.rpartition("/")[0]
            while parent and parent not in occupied:
                occupied.add(parent)
                parent = parent.rpartition("/")[0]
        records: list[FileRecord] = []
        for path in changed:
            old, new = before.get(path), after.get(path)
            if skipped(path):
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
        try:  # what a hit would refuse to serve is not recorded
            check_manifest(records, folder, serve_code=serve_code)
        except UnsafeManifestError as err:
            raise CacheError(f"not recorded: {err}") from None
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
        UnsafeManifestError
            Before anything is checked or written, when :func:`check_manifest` refuses the
            manifest (a path outside ``dest``, a code or hidden file, ...).
        FilesUnavailableError
            Before anything is written, if objects are missing or do not hold their
            recorded content (verified by xxh3, see :meth:`_checked`; a damaged object is
            removed from the area; the message names the paths). Later, chained to the
            cause, if placing a file fails or an object changed after it was verified.
        FolderConflictError
            Before anything is written, when ``dest`` disagrees with the records, or a file
            that was not stored cannot be taken from ``source_dir``; later, when a path
            changes while the folder is being served.
        """
        if mode not in ("link", "copy"):
            raise ValueError(f"mode must be 'link' or 'copy', not {mode!r}")
        dest = Path(dest)
        if source_dir is not None:
            records = [_moved_links(r, os.fspath(source_dir), os.fspath(dest)) for r in records]
        cleaned = check_manifest(records, dest, serve_code=self.serve_code)
        verified: dict[str, _Verified] = {}
        bad: list[str] = []
        for record in records:
            if not record.has_object or record.xxh3 in verified:
                continue
            found = self._checked(record)
            if isinstance(found, str):
                bad.append(f"{record.path!r} ({found})")
            else:
                verified[record.xxh3] = found
        if bad:
            raise FilesUnavailableError(
                f"{len(bad)} of {len(records)} objects missing or corrupt in {self.root}: "
                + ", ".join(bad[:5])
                + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
            )
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
        dest_fd = os.open(dest, os.O_RDONLY | _O_DIRECTORY)
        try:
            for i in order:
                record, action, current, source = steps[i]
                if action == "keep":
                    continue
                try:
                    self._apply(
                        record, action, current, source, link, dest, dest_fd, cleaned[i], verified
                    )
                except (FolderConflictError, FilesUnavailableError):
                    raise
                except OSError as err:
                    raise FilesUnavailableError(
                        f"cannot place {record.path!r} in {dest}: {err}"
                    ) from err
        finally:
            os.close(dest_fd)
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

    def _checked(self, record: FileRecord) -> _Verified | str:
        """Check the object of ``record`` before a hit serves it: its content digest (read,
        or memoised on its device, inode, size, mtime and ctime, which no ``utime``, ``cp -p``
        or ``rsync -a`` can set back), or for an object larger than ``verify_limit`` (when
        not 0) its seal and size only (its content when memoised). A damaged object is
        removed from the area, so the next run stores a sound one.

        Returns the object's verified state, or a short problem."""
        try:
            path = self.path_of(record.xxh3)
        except ValueError:
            return "invalid xxh3"
        try:
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK)
        except FileNotFoundError:
            return "missing"
        except OSError as err:
            if err.errno == errno.ELOOP:
                self._discard(path)
                return "not a regular file"
            return f"unreadable ({err.strerror})"
        with open(fd, "rb", buffering=0) as stream:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                problem = "not a regular file"
            elif st.st_size != record.size:
                problem = f"size {st.st_size} != {record.size}"
            elif known_digest(st) == record.xxh3:
                return _Verified(_memo_key(st), st.st_uid)
            elif (
                self.verify_limit
                and st.st_size > self.verify_limit
                and _is_sealed(st, record.xxh3, record.size)
            ):
                return _Verified(_memo_key(st), st.st_uid)  # the documented cheaper check
            else:
                digest, size = hash_stream(stream)
                after = os.fstat(fd)
                if _memo_key(after) != _memo_key(st) or size != st.st_size:
                    return "written to while it was checked"
                if digest != record.xxh3:
                    problem = "xxh3 mismatch"
                else:
                    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) >= _RACY_NS:
                        remember(path, st, digest)  # settled: memoise on its stamp
                    return _Verified(_memo_key(st), st.st_uid)
        if problem.startswith("size") or problem == "xxh3 mismatch":
            logger.warning("object %s of %r: %s; removed", record.xxh3, record.path, problem)
        self._discard(path, identity=(st.st_dev, st.st_ino))
        return problem

    def _apply(
        self,
        record: FileRecord,
        action: str,
        current: os.stat_result | None,
        source: tuple[Path, os.stat_result] | None,
        link: bool,
        dest: Path,
        dest_fd: int,
        relpath: str,
        verified: dict[str, _Verified],
    ) -> None:
        """Carry out one step of :meth:`materialize` through folder descriptors walked
        without following symlinks, checking first that the path is still as it was when the
        folder was checked. A path that held nothing is created without replacing anything
        (``O_EXCL``-like: a hard link, ``mkdir`` or ``symlink`` fails if something appeared);
        one that held the recorded "before" state is replaced by a rename."""
        name = relpath.rpartition("/")[2]
        creating = action not in ("delete", "rmdir")
        try:
            parent = _open_parent(dest_fd, relpath, create=creating)
        except FileNotFoundError:
            if creating:
                raise
            return  # a deletion whose folder is gone: done
        except OSError as err:
            raise FolderConflictError(
                f"{relpath!r} in {dest}: a folder on its path changed while the cached result "
                f"was served ({err.strerror})"
            ) from err

        def unchanged() -> None:
            if not _same_state(_lstat_at(name, parent), current):
                raise FolderConflictError(
                    f"{relpath!r} in {dest} changed while the cached result was served"
                )

        try:
            if action == "delete":
                unchanged()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=parent)
            elif action == "rmdir":
                try:
                    os.rmdir(name, dir_fd=parent)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    raise FolderConflictError(
                        f"{relpath!r} in {dest} is not empty, as it was for the recorded job"
                    ) from err
            elif action == "mkdir":
                if current is not None and not stat.S_ISDIR(current.st_mode):
                    unchanged()
                    os.unlink(name, dir_fd=parent)
                try:
                    os.mkdir(name, dir_fd=parent)
                except FileExistsError:
                    st = _lstat_at(name, parent)
                    if st is None or not stat.S_ISDIR(st.st_mode):
                        raise FolderConflictError(
                            f"{relpath!r} in {dest} appeared while the cached result was served"
                        ) from None
            elif action == "symlink":
                tmp = _tmp_base()
                os.symlink(record.target, tmp, dir_fd=parent)
                self._swap(tmp, name, parent, current, unchanged, relpath, dest)
            else:
                tmp = self._placed_temp(record, parent, link, source, verified.get(record.xxh3))
                self._swap(tmp, name, parent, current, unchanged, relpath, dest)
                with contextlib.suppress(OSError):
                    remember(dest / relpath, os.lstat(name, dir_fd=parent), record.xxh3)
        finally:
            os.close(parent)

    @staticmethod
    def _swap(
        tmp: str,
        name: str,
        parent: int,
        current: os.stat_result | None,
        unchanged: Callable[[], None],
        relpath: str,
        dest: Path,
    ) -> None:
        """Give ``tmp`` (in the folder ``parent``) the name ``name``: where nothing was, a
        no-clobber hard link (nothing that appeared meanwhile is replaced); where the recorded
        "before" state was, a rename over it (an empty folder there is removed first)."""
        try:
            if current is None:
                try:
                    os.link(tmp, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
                    return
                except FileExistsError:
                    raise FolderConflictError(
                        f"{relpath!r} in {dest} appeared while the cached result was served"
                    ) from None
                except OSError as err:
                    if err.errno in (errno.ENOENT, errno.ENOTDIR):
                        raise
                    # no hard links here: a rename, after checking that nothing appeared
            unchanged()
            if current is not None and stat.S_ISDIR(current.st_mode):
                os.rmdir(name, dir_fd=parent)
            os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=parent)

    def _placed_temp(
        self,
        record: FileRecord,
        parent: int,
        link: bool,
        source: tuple[Path, os.stat_result] | None,
        checked: _Verified | None,
    ) -> str:
        """A temporary file in the folder ``parent`` with the content of ``record``: a hard
        link to its object (``link``, large, and the object is this user's: no one else can
        write into the served file), else a reflink or a copy of its object, or of
        ``source`` (checked unchanged after copying) for a file that was not stored. The
        object must still be in the state it was verified in (``checked``)."""
        if source is None and checked is None:
            raise FilesUnavailableError(f"object {record.xxh3} of {record.path!r} not checked")
        if (
            source is None
            and checked is not None
            and link
            and record.size >= LINK_MIN_SIZE
            and checked.uid == _euid()
        ):
            tmp = _tmp_base()
            try:
                os.link(self.path_of(record.xxh3), tmp, dst_dir_fd=parent, follow_symlinks=False)
            except OSError as err:
                logger.debug("cannot hard-link %s (%s); copying", record.xxh3, err)
            else:
                st = os.lstat(tmp, dir_fd=parent)
                if _memo_key(st)[:4] == checked.key[:4] and st.st_uid == checked.uid:
                    return tmp
                os.unlink(tmp, dir_fd=parent)
                raise FilesUnavailableError(
                    f"object {record.xxh3} for {record.path!r} changed after it was checked"
                )
        src_path = self.path_of(record.xxh3) if source is None else source[0]
        src_fd = os.open(src_path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK)
        tmp = _tmp_base()
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600, dir_fd=parent
            )
        except BaseException:
            os.close(src_fd)
            raise
        try:
            try:
                expected = source[1] if source is not None else None
                if (
                    checked is not None
                    and source is None
                    and _memo_key(os.fstat(src_fd)) != checked.key
                ):
                    raise FilesUnavailableError(
                        f"object {record.xxh3} for {record.path!r} changed after it was checked"
                    )
                _clone_or_copy(src_fd, fd)
                if self.fsync:
                    os.fsync(fd)
                os.fchmod(fd, (record.mode & 0o777) or 0o644)
                size = os.fstat(fd).st_size
                now = _memo_key(os.fstat(src_fd))
                if expected is not None and now != _memo_key(expected):
                    raise FolderConflictError(
                        f"{src_path} changed while it was copied for {record.path!r}"
                    )
                if checked is not None and source is None and now != checked.key:
                    raise FilesUnavailableError(
                        f"object {record.xxh3} for {record.path!r} changed while it was copied"
                    )
            finally:
                os.close(fd)
                os.close(src_fd)
            if size != record.size:
                raise FilesUnavailableError(
                    f"object {record.xxh3} for {record.path!r} is corrupt (size {size})"
                )
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=parent)
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
                held = (pid, now, os.fspath(folder / _tmp_base()[len(_TMP_PREFIX) :]))
                _PIN_FILES[key] = held
            fd = os.open(held[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW, 0o644)
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
            pid = int(match.group(1)) if match is not None and match.group(2) == _host() else 0
            if pid == os.getpid():
                continue  # this process's own: it records and collects in turn, not at once
            gone = pid > 0 and _process_gone(pid)
            if gone or now - st.st_mtime > PIN_TTL or not stat.S_ISREG(st.st_mode):
                if clean:
                    _unlink_quietly(Path(entry.path))
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK)
                with open(fd, "rb") as stream:  # bounded: a pin file only keeps objects
                    text = stream.read(_PIN_READ_MAX).decode("ascii", "replace")
            except OSError:
                continue
            ids.update(line for line in text.split() if _HEX_ID.fullmatch(line))
        return ids

    def set_aside(self, xxh3: str) -> Path | None:
        """Move the object ``xxh3`` to a temporary name in the area (a garbage collection's
        first step); None when it is not there."""
        aside = _tmp_name(self.root)
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
        _unlink_quietly(aside)

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
                stale = [e for e in entries if e.name.startswith(_TMP_PREFIX)]
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
                and owner.group(2) == _host()
                and st.st_mtime < dead_cutoff
                and _process_gone(int(owner.group(1)))
            )
            if st.st_ctime > cutoff and not dead:
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
