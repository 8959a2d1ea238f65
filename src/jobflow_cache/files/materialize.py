"""Serving a hit's files into a run folder: plan, check, apply and swap.

A path is changed only where it holds what the recorded job found or already holds what it
left; anything else raises :class:`~jobflow_cache.errors.FolderConflictError` before anything
is changed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobflow_cache.errors import (
    FilesUnavailableError,
    FolderConflictError,
)
from jobflow_cache.files.digests import (
    RACY_NS,
    file_digest,
    hash_stream,
    known_digest,
    memo_key,
    remember,
)
from jobflow_cache.files.fsops import (
    O_DIRECTORY,
    O_NOFOLLOW,
    O_NONBLOCK,
    clone_or_copy,
    lstat_or_none,
    safe_file,
    tmp_base,
)
from jobflow_cache.files.layout import PlaceMode
from jobflow_cache.files.manifest import (
    FileRecord,
    FileState,
    check_manifest,
    clean_relpath,
)
from jobflow_cache.files.storage import ObjectStorage, is_sealed

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "LINK_MIN_SIZE",
    "Materializer",
    "differences",
]

logger = logging.getLogger(__name__)

LINK_MIN_SIZE = 64 * 2**20
"""With ``JOBFLOW_CACHE_FILES=link`` (opt-in), files of at least this many bytes are served as
read-only hard links to their object instead of copies, where the file system has no reflinks
and the process does not run as root (read-only bits do not stop root), and the object belongs
to this user (another user could write into it after it is served). Such a file cannot be
written in place by a later job (``PermissionError``, as for any read-only file); replacing it
(write a new file, rename over it) works. Every object is verified by its content before it is
linked, as before it is copied (see :meth:`.ObjectArea.materialize`)."""


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
            st = lstat_or_none(dest / prefix)
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
                target, lstat_or_none(target), record
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
        path = safe_file(Path(source_dir), relpath)
        st = os.lstat(path)
    except (OSError, ValueError):
        return None
    if st.st_size != record.size or file_digest(path, st) != record.xxh3:
        return None
    return path, st


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


class _Verified:
    """The state (:func:`memo_key`) and owner of an object when a hit checked it."""

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
                below = os.open(part, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
                below = os.open(part, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


class Materializer(ObjectStorage):
    """Place a manifest's files into a run folder (the part of :class:`.ObjectArea` a hit
    uses)."""

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
        dest_fd = os.open(dest, os.O_RDONLY | O_DIRECTORY)
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
            current = lstat_or_none(target)
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
            fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK)
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
                return _Verified(memo_key(st), st.st_uid)
            elif (
                self.verify_limit
                and st.st_size > self.verify_limit
                and is_sealed(st, record.xxh3, record.size)
            ):
                return _Verified(memo_key(st), st.st_uid)  # the documented cheaper check
            else:
                digest, size = hash_stream(stream)
                after = os.fstat(fd)
                if memo_key(after) != memo_key(st) or size != st.st_size:
                    return "written to while it was checked"
                if digest != record.xxh3:
                    problem = "xxh3 mismatch"
                else:
                    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) >= RACY_NS:
                        remember(path, st, digest)  # settled: memoise on its stamp
                    return _Verified(memo_key(st), st.st_uid)
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
                tmp = tmp_base()
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
            tmp = tmp_base()
            try:
                os.link(self.path_of(record.xxh3), tmp, dst_dir_fd=parent, follow_symlinks=False)
            except OSError as err:
                logger.debug("cannot hard-link %s (%s); copying", record.xxh3, err)
            else:
                st = os.lstat(tmp, dir_fd=parent)
                if memo_key(st)[:4] == checked.key[:4] and st.st_uid == checked.uid:
                    return tmp
                os.unlink(tmp, dir_fd=parent)
                raise FilesUnavailableError(
                    f"object {record.xxh3} for {record.path!r} changed after it was checked"
                )
        src_path = self.path_of(record.xxh3) if source is None else source[0]
        src_fd = os.open(src_path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK)
        tmp = tmp_base()
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o600, dir_fd=parent
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
                    and memo_key(os.fstat(src_fd)) != checked.key
                ):
                    raise FilesUnavailableError(
                        f"object {record.xxh3} for {record.path!r} changed after it was checked"
                    )
                clone_or_copy(src_fd, fd)
                if self.fsync:
                    os.fsync(fd)
                os.fchmod(fd, (record.mode & 0o777) or 0o644)
                size = os.fstat(fd).st_size
                now = memo_key(os.fstat(src_fd))
                if expected is not None and now != memo_key(expected):
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
