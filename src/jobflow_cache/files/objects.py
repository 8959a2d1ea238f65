"""The content-addressed object area: :class:`ObjectArea`, made of its parts.

Recording a job compares a :func:`.snapshot` of its run folder taken before it ran with one
taken after, and keeps, for every path the job created, modified or deleted, the state it
found ("before": absent, a file of known size and, when cheaply known, content digest, a
symlink, a folder) and the state it left ("after": a file, a symlink with its target text, an
empty folder, or deleted); see :class:`.FileRecord`. Serving (:meth:`ObjectArea.materialize`)
checks the whole folder against those records before changing anything: a path is changed
only where it still holds the recorded "before" state (or already holds the "after" state);
anything else raises :class:`~jobflow_cache.errors.FolderConflictError`, and the job runs.

The object area never shares an inode with a folder a user or job can write (except with the
opt-in ``link`` placement of large files, see :data:`.LINK_MIN_SIZE`): files are stored and
served as reflinks (copy-on-write clones) where the file system has them, copies elsewhere.

A manifest read from a store is untrusted (:func:`.check_manifest`): it can only create,
below the run folder, the paths the recorded job changed, walked without following symlinks,
never through or over something that appeared meanwhile, and never code or hidden files
(:data:`.CODE_FILE_PATTERNS`) unless ``SERVE_CODE_FILES``. Every object is verified by its
content before a hit places it (:meth:`ObjectArea.materialize`). Garbage collection keeps
objects stored recently (:data:`.GC_GRACE`) and objects pinned by processes recording
entries (:meth:`ObjectArea.pinned`).

:class:`ObjectArea` is one class made of the parts below, each a class of its own module
(read from the bottom up; each part uses only those below it):

=====================  =====================================================================
part                   what it does
=====================  =====================================================================
:mod:`.materialize`    :class:`.Materializer`: plan, check, apply and swap a hit's files
                       into a run folder (``materialize``); :func:`.differences`
:mod:`.recording`      :class:`.Recorder`: record what a job changed in its run folder
                       (``record``, ``record_changes``)
:mod:`.storage`        :class:`.ObjectStorage`: the objects themselves (``ingest``, seals,
                       publish, ``has_all``, ``verify``, ``iter_objects``, ``remove``)
:mod:`.housekeeping`   :class:`.Housekeeping`: pins of recording processes, stale temporary
                       files, ``set_aside``/``put_back`` for garbage collection
:mod:`.layout`         :class:`.AreaLayout`: the root, the settings, ``path_of``
=====================  =====================================================================

This module also re-exports the names it held before the split, so
``from jobflow_cache.files.objects import ...`` keeps working.
"""

from __future__ import annotations

from jobflow_cache.files.digests import file_digest, hash_stream, known_digest, remember
from jobflow_cache.files.fsops import CHUNK_SIZE
from jobflow_cache.files.housekeeping import GC_GRACE, PIN_TTL, STALE_DEAD_AFTER
from jobflow_cache.files.layout import VERIFY_FILES_LIMIT, PlaceMode
from jobflow_cache.files.materialize import LINK_MIN_SIZE, Materializer, differences
from jobflow_cache.files.recording import LIVE_FILE_PATTERNS, Recorder
from jobflow_cache.files.snapshots import (
    PREHASH_MAX_FILE,
    Snapshot,
    changed_files,
    changed_paths,
    excluder,
    prehash,
    snapshot,
)

__all__ = [
    "CHUNK_SIZE",
    "GC_GRACE",
    "LINK_MIN_SIZE",
    "LIVE_FILE_PATTERNS",
    "PIN_TTL",
    "PREHASH_MAX_FILE",
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


class ObjectArea(Recorder, Materializer):
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
    >>> from pathlib import Path
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
