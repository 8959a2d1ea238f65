"""Content digests of the files and folders a job's inputs name, memoised on their ``stat``.

A str (or ``Path``) input that names an existing file is hashed by its bytes, a folder by its
tree, so that a job reading ``POSCAR`` misses when ``POSCAR`` changed, whatever its path. Reading
a 10 GB ``WAVECAR`` on every lookup would cost seconds, so a content digest is memoised on the
file's identity and state::

    (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) -> xxh3_128 hex of the bytes

in the process (a dict) and, for files of at least :data:`PERSIST_MIN` bytes, in a small SQLite
file of this machine (:func:`use_database`; the executor puts it beside the embedded cache,
``$JOBFLOW_CACHE_DIR/contents/<host>.sqlite``), so other worker processes on the same host do not
read an unchanged file again either. A write changes ``mtime`` and ``ctime``; ``chmod``, a hard
link or ``touch -d`` change ``ctime``, which no program can set back.

**Racy files.** File systems stamp times from a coarse clock (a few ms on Linux, up to 2 s on
some network and FAT file systems): a file rewritten with the same size within one tick keeps its
key. As git does with its index, a digest is only memoised when the file's last change
(``max(mtime, ctime)``) is at least :data:`RACY_NS` older than the moment its ``stat`` was
taken; a file changed more recently is read again the next time (the job that wrote it just
finished: it is read once more, by the first job that names it later than that).

The digest of a file is the ``xxh3_128`` hex digest of its bytes, the same as the object id of
:class:`~jobflow_cache.files.ObjectArea`: recording code that hashed a file tells the memo with
:func:`remember`.

**Trees.** :func:`tree_digest` hashes a folder's relative names, kinds, sizes, content digests,
executable bits and symlink targets (links are not followed below the folder; a link to a file
also counts its target's content), empty folders included, files matching the exclude patterns
left out (a batch system's ``queue.out``). A walk stops at :data:`MAX_TREE_FILES` entries, and
a folder whose not-yet-memoised files hold more than :data:`MAX_TREE_BYTES` bytes is not read:
both raise :class:`~jobflow_cache.errors.InputTooLargeError` naming the folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import xxhash

from jobflow_cache.errors import InputTooLargeError
from jobflow_cache.files.digests import hash_stream
from jobflow_cache.files.snapshots import excluder

__all__ = [
    "MAX_TREE_BYTES",
    "MAX_TREE_FILES",
    "PERSIST_MIN",
    "RACY_NS",
    "ContentMemo",
    "TreeDigest",
    "describe",
    "file_digest",
    "folder_names",
    "memo",
    "remember",
    "tree_digest",
    "use_database",
]

logger = logging.getLogger(__name__)

#: A digest is memoised only for a file whose last change is at least this much older than the
#: ``stat`` it was hashed under (2 s: the coarsest common time stamp granularity).
RACY_NS = 2_000_000_000

#: Files of at least this many bytes have their digests kept in the machine's SQLite memo too
#: (reading a smaller file costs about what a lookup in the database does).
PERSIST_MIN = 256 * 1024

#: Entries (files, folders, links) a :func:`tree_digest` walks at most.
MAX_TREE_FILES = 50_000

#: Bytes of files not in the memo that a :func:`tree_digest` reads at most.
MAX_TREE_BYTES = 4 * 2**30

#: Digests the in-process memo keeps (the oldest are dropped beyond it).
MEMO_MAX = 200_000

_SCHEMA_VERSION = 1
_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in after the stat never blocks

Key = tuple[int, int, int, int, int]


def _key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _signed(value: int) -> int:
    """A 64-bit unsigned number (st_dev, st_ino) as SQLite's signed INTEGER."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _settled(st: os.stat_result, now_ns: int) -> bool:
    """Whether a file's last change is older than :data:`RACY_NS` at ``now_ns``."""
    return now_ns - max(st.st_mtime_ns, st.st_ctime_ns) >= RACY_NS


class ContentMemo:
    """Content digests by ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``.

    In process always; for files of at least :data:`PERSIST_MIN` bytes also in a SQLite file
    (``db_path``), best effort: any error with it leaves the memo in memory only.

    ``stats`` counts ``hits`` (in process), ``db_hits``, ``reads`` (files read and hashed) and
    ``bytes_read``.
    """

    def __init__(self, db_path: str | os.PathLike[str] | None = None) -> None:
        self._memo: dict[Key, str] = {}
        self._lock = threading.Lock()
        self._db_path = Path(db_path) if db_path is not None else None
        self.db_str = os.fspath(db_path) if db_path is not None else None
        self._db: sqlite3.Connection | None = None
        self._db_failed = False
        self.stats: Counter[str] = Counter()

    @property
    def db_path(self) -> Path | None:
        return self._db_path

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

    def clear(self) -> None:
        """Forget the in-process digests (the database keeps its own)."""
        with self._lock:
            self._memo.clear()

    # -- the database --------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection | None:
        if self._db is not None or self._db_failed or self._db_path is None:
            return self._db
        try:
            self._db_path.parent.mkdir(parents=True, exist_ok=True)
            problem = _not_private(self._db_path)
            if problem is not None:
                raise OSError(problem)
            db = sqlite3.connect(
                self._db_path, timeout=1.0, isolation_level=None, check_same_thread=False
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, _SCHEMA_VERSION):
                    raise sqlite3.DatabaseError(f"unknown memo schema version {version}")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS digests (dev INTEGER NOT NULL, "
                    "ino INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, "
                    "ctime_ns INTEGER NOT NULL, xxh3 TEXT NOT NULL, PRIMARY KEY (dev, ino)) "
                    "WITHOUT ROWID"
                )
                if version == 0:
                    db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            except BaseException:
                db.close()
                raise
        except (sqlite3.Error, OSError) as err:
            self._give_up(err)
            return None
        self._db = db
        return db

    def _give_up(self, err: BaseException) -> None:
        logger.debug("content memo %s unusable (%s): memoising in memory only", self._db_path, err)
        self._db_failed = True
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def _db_get(self, key: Key) -> str | None:
        with self._lock:
            db = self._connection()
            if db is None:
                return None
            try:
                row = db.execute(
                    "SELECT size, mtime_ns, ctime_ns, xxh3 FROM digests WHERE dev=? AND ino=?",
                    (_signed(key[0]), _signed(key[1])),
                ).fetchone()
            except sqlite3.Error as err:
                self._give_up(err)
                return None
        if row is None or tuple(row[:3]) != key[2:]:
            return None
        digest = row[3]
        return digest if isinstance(digest, str) and len(digest) == 32 else None

    def _db_put(self, key: Key, digest: str) -> None:
        with self._lock:
            db = self._connection()
            if db is None:
                return
            try:
                db.execute(
                    "INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)",
                    (_signed(key[0]), _signed(key[1]), *key[2:], digest),
                )
            except sqlite3.Error as err:
                self._give_up(err)

    # -- lookups ---------------------------------------------------------------------------
    def get(self, st: os.stat_result) -> str | None:
        """The memoised digest of a file in state ``st`` (its ``stat``), or None."""
        key = _key(st)
        digest = self._memo.get(key)
        if digest is not None:
            self.stats["hits"] += 1
            return digest
        if st.st_size >= PERSIST_MIN and self._db_path is not None:
            digest = self._db_get(key)
            if digest is not None:
                self.stats["db_hits"] += 1
                self._keep(key, digest)
                return digest
        return None

    def known(self, st: os.stat_result) -> bool:
        """Whether :meth:`get` would answer without reading (counts nothing)."""
        key = _key(st)
        if key in self._memo:
            return True
        return (
            st.st_size >= PERSIST_MIN
            and self._db_path is not None
            and self._db_get(key) is not None
        )

    def put(self, st: os.stat_result, digest: str, now_ns: int | None = None) -> bool:
        """Memoise ``digest`` for a file in state ``st`` unless it changed too recently to be
        sure (:data:`RACY_NS`); return whether it was kept."""
        if not _settled(st, time.time_ns() if now_ns is None else now_ns):
            return False
        key = _key(st)
        self._keep(key, digest)
        if st.st_size >= PERSIST_MIN and self._db_path is not None:
            self._db_put(key, digest)
        return True

    def _keep(self, key: Key, digest: str) -> None:
        memo = self._memo
        if len(memo) >= MEMO_MAX:
            with self._lock, contextlib.suppress(KeyError, StopIteration, RuntimeError):
                for _ in range(MEMO_MAX // 10):  # drop the oldest tenth
                    del memo[next(iter(memo))]
        memo[key] = digest


def _not_private(path: Path) -> str | None:
    """Why the memo file ``path`` (and its folder) could be written by someone else than
    this user, or None. A digest planted there would make a changed file (an input, a file
    object a hit serves) pass for unchanged, so such a memo is not used (memory only)."""
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None:  # pragma: no cover - Windows
        return None
    me = geteuid()
    for item in (path.parent, path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            st = os.lstat(item)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            return f"{item} is a symlink"
        if st.st_uid != me:
            return f"{item} belongs to another user"
        if st.st_mode & 0o022 and not (item == path.parent and st.st_mode & stat.S_ISVTX):
            return f"{item} is writable by group or others"
    return None


_MEMO = ContentMemo()


def memo() -> ContentMemo:
    """The memo of this process."""
    return _MEMO


def use_database(path: str | os.PathLike[str] | None) -> None:
    """Keep the digests of large files in the SQLite file ``path`` too (None: in memory only).

    A no-op when the memo already uses that file; the in-process digests are kept either way.
    """
    global _MEMO
    if path is not None and _MEMO.db_path is not None and os.fspath(path) == _MEMO.db_str:
        return  # the common case, without building a Path
    new = Path(path) if path is not None else None
    if _MEMO.db_path == new:
        return
    old = _MEMO
    fresh = ContentMemo(new)
    fresh._memo = old._memo
    fresh.stats = old.stats
    _MEMO = fresh
    old.close()


def default_database(cache_dir: str | os.PathLike[str]) -> Path:
    """The memo file of this host in a cache folder: ``<cache_dir>/contents/<host>.sqlite``.

    One file per host: SQLite's WAL mode needs memory shared between the processes using a
    file, and (device, inode) numbers only mean something on one machine.
    """
    host = socket.gethostname().replace("/", "_") or "localhost"
    return Path(cache_dir).expanduser() / "contents" / f"{host}.sqlite"


# --------------------------------------------------------------------------- files


def file_digest(path: str | os.PathLike[str], st: os.stat_result | None = None) -> str:
    """The ``xxh3_128`` hex digest of a regular file's bytes (symlinks are followed).

    ``st`` is the file's ``stat`` when the caller has it. The memo answers without reading
    when the file's (device, inode, size, mtime, ctime) are those of a digest it holds.

    Raises
    ------
    OSError
        The file cannot be read; ``IsADirectoryError`` (an ``OSError``) if it is no regular file.
    """
    if st is None:
        st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(f"not a regular file: {os.fspath(path)}")
    memo = _MEMO
    digest = memo.get(st)
    if digest is not None:
        return digest
    now = time.time_ns()
    fd = os.open(path, os.O_RDONLY | _O_NONBLOCK)
    with open(fd, "rb", buffering=0) as stream:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise IsADirectoryError(f"not a regular file: {os.fspath(path)}")
        if _key(opened) != _key(st):  # changed since the caller's stat: what is there now
            st = opened
            digest = memo.get(st)
            if digest is not None:
                return digest
        digest, size = hash_stream(stream)
        after = os.fstat(fd)
    memo.stats["reads"] += 1
    memo.stats["bytes_read"] += size
    if _key(after) == _key(st) and size == st.st_size:  # not written while it was read
        memo.put(st, digest, now)
    return digest


def remember(path: str | os.PathLike[str], st: os.stat_result | None, digest: str) -> None:
    """Tell the memo that the file ``path`` (in state ``st``, its ``stat`` taken before its
    bytes were read; None: taken now) holds content ``digest`` (``xxh3_128`` hex).

    Kept only if the file's last change is at least :data:`RACY_NS` older than now (callers
    pass a ``stat`` taken just before they read the file, and call this right after)."""
    try:
        if st is None:
            st = os.stat(path)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode) and isinstance(digest, str) and len(digest) == 32:
        _MEMO.put(st, digest)


# --------------------------------------------------------------------------- folder names

_LISTINGS: dict[str, tuple[int, int, int, frozenset[str]]] = {}
_LISTINGS_MAX = 1_000
_LISTING_CACHED_FROM = 32  # smaller folders are listed again (it costs about a stat)


def folder_names(folder: str) -> frozenset[str]:
    """The names in ``folder`` (not recursive), answered from the last listing while the
    folder's (inode, mtime, ctime) are unchanged since a listing taken :data:`RACY_NS` or more
    after its last change (an entry added or removed changes them)."""
    cached = _LISTINGS.get(folder)
    if cached is None:  # listed first: a small folder, never kept, needs no stat
        names = frozenset(os.listdir(folder))
        if len(names) < _LISTING_CACHED_FROM:
            return names
        st = os.stat(folder)  # after the listing: a change in between only makes it unsettled
        # (or changes the key), so a stale listing is never kept under a newer key
        if _settled(st, time.time_ns()):
            if len(_LISTINGS) >= _LISTINGS_MAX:
                _LISTINGS.clear()
            _LISTINGS[folder] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, names)
        return names
    st = os.stat(folder)
    if cached[:3] == (st.st_ino, st.st_mtime_ns, st.st_ctime_ns):
        return cached[3]
    names = frozenset(os.listdir(folder))
    if len(names) >= _LISTING_CACHED_FROM and _settled(st, time.time_ns()):
        if len(_LISTINGS) >= _LISTINGS_MAX:
            _LISTINGS.clear()
        _LISTINGS[folder] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, names)
    return names


# --------------------------------------------------------------------------- trees


@dataclass(frozen=True)
class TreeDigest:
    """What :func:`tree_digest` found in a folder.

    Attributes
    ----------
    digest
        ``xxh3_128`` hex digest of the folder's canonical listing.
    entries
        Files, folders and links below the folder (the folder itself not counted).
    size
        Bytes of its regular files (and of the files its links point to).
    read
        Bytes read to hash it (files the memo did not know).
    """

    digest: str
    entries: int
    size: int
    read: int


def _exclusion(exclude: Callable[[str], bool] | Sequence[str]) -> Callable[[str], bool]:
    if callable(exclude):
        return exclude
    return excluder(tuple(exclude))


def tree_digest(
    folder: str | os.PathLike[str],
    exclude: Callable[[str], bool] | Sequence[str] = (),
    max_files: int | None = None,
    max_bytes_unknown: int | None = None,
) -> TreeDigest:
    """Digest of a folder's tree: relative names, kinds, sizes, content digests, executable
    bits, symlink targets (not followed below ``folder``; a link to a regular file counts its
    target's content too) and empty folders.

    Parameters
    ----------
    folder
        The folder (a symlink to a folder is followed).
    exclude
        Glob patterns (as for :func:`jobflow_cache.files.snapshot`: matched against the relative
        path and the name; a matching folder is not entered) or a predicate on the relative path.
    max_files
        Entries walked at most (default :data:`MAX_TREE_FILES`).
    max_bytes_unknown
        Bytes of files the memo does not know that may be read (default
        :data:`MAX_TREE_BYTES`).

    Raises
    ------
    InputTooLargeError
        Past either bound; nothing is read then.
    OSError
        ``folder`` is no folder or cannot be listed.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = (Path(tmp) / "INCAR").write_text("ENCUT = 520")
    ...     first = tree_digest(tmp)
    ...     _ = (Path(tmp) / "queue.out").write_text("started")
    ...     same = tree_digest(tmp, exclude=["queue.out"])
    ...     (first.entries, first.digest == same.digest)
    (1, True)
    """
    root = os.fspath(folder)
    max_files = MAX_TREE_FILES if max_files is None else max_files
    max_bytes_unknown = MAX_TREE_BYTES if max_bytes_unknown is None else max_bytes_unknown
    excluded = _exclusion(exclude)
    records: list[list[Any]] = []
    files: list[tuple[int, str, os.stat_result]] = []  # index in records, path, stat
    pending: list[tuple[str, str]] = [(root, "")]
    count = 0
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as listing:
                items = list(listing)
        except (FileNotFoundError, NotADirectoryError):
            if not prefix:
                raise
            continue
        except PermissionError:
            if not prefix:
                raise
            records.append(["unreadable", prefix.rstrip("/")])
            continue
        count += len(items)
        if count > max_files:
            raise InputTooLargeError(
                f"{root} holds more than {max_files} files and folders", path=root
            )
        for item in items:
            rel = prefix + item.name
            if excluded(rel):
                continue
            try:
                st = item.stat(follow_symlinks=False)
            except FileNotFoundError:  # vanished during the walk
                continue
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                records.append(["dir", rel])
                pending.append((item.path, rel + "/"))
            elif stat.S_ISREG(mode):
                files.append((len(records), item.path, st))
                records.append(["file", rel, st.st_size, bool(mode & 0o111)])
            elif stat.S_ISLNK(mode):
                text = os.readlink(item.path)
                try:
                    target = os.stat(item.path)
                except OSError:
                    target = None
                if target is not None and stat.S_ISREG(target.st_mode):
                    files.append((len(records), item.path, target))
                    records.append(["link", rel, text, target.st_size])
                else:
                    records.append(["link", rel, text])
            else:  # FIFO, socket, device: its kind only (never opened)
                records.append(["special", rel, stat.S_IFMT(mode)])
    memo = _MEMO
    unknown = sum(st.st_size for _, _, st in files if not memo.known(st))
    if unknown > max_bytes_unknown:
        raise InputTooLargeError(
            f"{root} holds {unknown} bytes of files not hashed before (more than "
            f"{max_bytes_unknown})",
            path=root,
        )
    before = memo.stats["bytes_read"]
    size = 0
    for index, path, st in files:
        try:
            digest = file_digest(path, st)
        except PermissionError:
            digest = f"unreadable:{st.st_mtime_ns}"
        except FileNotFoundError:
            digest = "vanished"
        records[index].append(digest)
        size += st.st_size
    records.sort(key=lambda record: record[1])
    digest = xxhash.xxh3_128_hexdigest(orjson.dumps(records))
    return TreeDigest(digest, len(records), size, memo.stats["bytes_read"] - before)


# --------------------------------------------------------------------------- inputs


def describe(
    path: str,
    exclude: Callable[[str], bool] | Sequence[str] = (),
    max_files: int | None = None,
    max_bytes_unknown: int | None = None,
) -> list[str] | None:
    """What an input string that may name a path stands for, by content, or None when it names
    nothing (then it is hashed as the string it is).

    * a regular file (or a symlink to one): ``["file", content digest]``;
    * a folder (or a symlink to one): ``["tree", tree digest]`` (see :func:`tree_digest`);
    * a dangling symlink: ``["link", its text]``;
    * anything else (a device such as ``/dev/null``, a FIFO): None.

    Raises
    ------
    InputTooLargeError
        A folder past the bounds of :func:`tree_digest`.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        try:
            return ["link", os.readlink(path)]
        except OSError:
            return None
    except (OSError, ValueError):  # not a path at all (NUL byte, too long, ...)
        return None
    if stat.S_ISREG(st.st_mode):
        try:
            return ["file", file_digest(path, st)]
        except PermissionError:  # the job cannot read it either: its state stands for it
            return ["unreadable", str(st.st_size), str(st.st_mtime_ns)]
    if stat.S_ISDIR(st.st_mode):
        try:
            return ["tree", tree_digest(path, exclude, max_files, max_bytes_unknown).digest]
        except PermissionError:
            return ["unreadable", "", str(st.st_mtime_ns)]
    return None
