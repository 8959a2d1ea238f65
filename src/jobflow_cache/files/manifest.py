"""What a manifest says a job changed in its run folder, and what one read from a store may say.

A cache entry keeps, for every path its job created, modified or deleted, a :class:`FileRecord`:
the state the job left ("after": a file, a symlink with its target text, an empty folder, or
deleted) and the state it found (:class:`FileState`, "before"). A manifest read from a store is
untrusted: :func:`check_manifest` refuses, before anything is served, every path that is not a
normalised relative path below the run folder, and code or hidden files
(:data:`CODE_FILE_PATTERNS`) unless ``SERVE_CODE_FILES``. How records are made and served is in
:mod:`.files.recording` and :mod:`.files.materialize`.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Literal

import pydantic

from jobflow_cache.errors import UnsafeManifestError

__all__ = [
    "CODE_FILE_PATTERNS",
    "FileRecord",
    "FileState",
    "check_manifest",
    "clean_relpath",
    "is_code_path",
]


CODE_FILE_PATTERNS = (
    "*.py",
    "*.pyc",
    "*.pyo",
    "*.pyw",
    "*.pth",
    "*.so",
    "*.pyd",
    "*.egg-link",
    "sitecustomize*",
    "usercustomize*",
    "__pycache__",
    ".*",
)
"""Names (matched against every component of a manifest path) of files a hit never places
unless ``JOBFLOW_CACHE_SERVE_CODE_FILES`` is on: what Python would import from a run folder
that is the working directory or on ``sys.path`` (modules, byte code, extension modules,
``.pth`` files, ``sitecustomize``), and hidden names (``.bashrc``, ``.git/hooks/...``,
``.envrc``) that shells, git and editors run. Symlinks leading out of the run folder (a
package directory elsewhere) are held to the same rule."""


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


def clean_relpath(relpath: str) -> str:
    """Normalise a relative POSIX path; raise ``ValueError`` if absolute or escaping.

    ``"./a//b"`` becomes ``"a/b"``; ``""``, ``"."``, ``"/a"`` and anything with a ``..``
    component are refused.
    """
    pure = PurePosixPath(relpath)
    if not relpath or pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise ValueError(f"not a safe relative path: {relpath!r}")
    return pure.as_posix()


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


_CODE_NAME = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in CODE_FILE_PATTERNS))


_MAX_PATH = 4096


_MAX_NAME = 255


def is_code_path(relpath: str) -> bool:
    """Whether a component of the relative POSIX path ``relpath`` matches
    :data:`CODE_FILE_PATTERNS` (a module, byte code, a ``.pth`` file, a hidden name...).

    Examples
    --------
    >>> [is_code_path(p) for p in ("OUTCAR", "victim_jobs.py", ".bashrc", "a/__pycache__/x")]
    [False, True, True, True]
    """
    return any(_CODE_NAME.fullmatch(part) for part in relpath.split("/"))


def _link_leaves(relpath: str, target: str, dest: str) -> bool:
    """Whether the symlink ``relpath`` (below ``dest``) with ``target`` may lead out of
    ``dest``: an absolute target elsewhere, more leading ``..`` than the link is deep, or a
    ``..`` after another component (the kernel resolves that one through what precedes it)."""
    if not target:
        return True
    if target.startswith("/"):
        norm = posixpath.normpath(target)
        root = posixpath.normpath(dest)
        return ".." in target.split("/") or not (norm == root or norm.startswith(root + "/"))
    parts = [part for part in target.split("/") if part not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    if ".." in parts[ups:]:
        return True
    return ups > relpath.count("/")


def check_manifest(
    records: Sequence[FileRecord], dest: str | os.PathLike[str], *, serve_code: bool = False
) -> list[str]:
    """Check a manifest from a store before anything of it is served into ``dest``.

    Every path must be a normalised relative POSIX path (no ``..``, ``.``, empty or
    absolute component, no control character, no NUL), unique, and not below another
    record unless both are deletions of what was a folder; modes carry no setuid, setgid or
    sticky bit. Paths with a component matching :data:`CODE_FILE_PATTERNS`, and symlinks
    whose target may lead out of ``dest``, are refused unless ``serve_code``; even then only
    when the job created them (nothing was there before: such a file never replaces or
    deletes one).

    Returns
    -------
    list[str]
        The paths, in the order of ``records``.

    Raises
    ------
    UnsafeManifestError
        Naming the first offending path and why.

    Examples
    --------
    >>> check_manifest([FileRecord(path="OUTCAR", xxh3="0" * 32)], "/run")
    ['OUTCAR']
    >>> try:
    ...     check_manifest([FileRecord(path="../jobs.py", xxh3="0" * 32)], "/run")
    ... except UnsafeManifestError as err:
    ...     print(err)
    refusing to serve '../jobs.py' into /run: absolute, empty or outside the run folder
    """
    dest = os.fspath(dest)
    paths: list[str] = []
    kinds: dict[str, FileRecord] = {}

    def refuse(path: object, why: str) -> UnsafeManifestError:
        return UnsafeManifestError(f"refusing to serve {path!r} into {dest}: {why}")

    for record in records:
        path = record.path
        if not isinstance(path, str) or _CONTROL.search(path):
            raise refuse(path, "a control character in the path")
        if len(path) > _MAX_PATH or any(len(part) > _MAX_NAME for part in path.split("/")):
            raise refuse(path, "a path or name too long")
        try:
            clean = clean_relpath(path)
        except ValueError:
            raise refuse(path, "absolute, empty or outside the run folder") from None
        if clean != path or "." in path.split("/"):
            raise refuse(path, "not a normalised relative path")
        if path in kinds:
            raise refuse(path, "listed twice")
        if record.mode & ~0o777 or record.mode < 0:
            raise refuse(path, f"mode {record.mode:#o} (setuid, setgid or sticky bits)")
        if record.kind == "symlink" and "\x00" in record.target:
            raise refuse(path, "a NUL in the symlink target")
        leaves = record.kind == "symlink" and _link_leaves(path, record.target, dest)
        if is_code_path(path) or leaves:
            what = (
                f"a symlink to {record.target!r}, out of the run folder"
                if leaves and not is_code_path(path)
                else "a file Python would import, or a hidden file"
            )
            if not serve_code:
                raise refuse(path, f"{what} (JOBFLOW_CACHE_SERVE_CODE_FILES is off)")
            if record.kind == "deleted" or record.before is not None:
                raise refuse(path, f"{what} that the job did not create (it replaces or deletes)")
        kinds[path] = record
        paths.append(path)
    for path, record in kinds.items():
        prefix = path
        while "/" in prefix:
            prefix = prefix.rpartition("/")[0]
            above = kinds.get(prefix)
            if above is None:
                continue
            before = above.before
            if record.kind != "deleted" or before is None or before.kind != "dir":
                raise refuse(path, f"below {prefix!r}, which the manifest makes {above.kind!r}")
    return paths
