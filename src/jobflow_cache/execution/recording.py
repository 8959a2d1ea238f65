"""Running a job the cache does not serve, and recording what it did as an entry.

:meth:`Recorder.run` runs the job's function in its run folder and records a
:class:`.CacheEntry`: the output and the other parts of the ``Response`` as JSON, the files the
job changed in its folder (listed before and after: :func:`.snapshot`, stored in the object
area), the job uuids and folders its inputs named (:class:`.Refs`), and the canonical input
when it is small enough. The job is registered in the lineage *before* it runs, so a child of
a job that fails sees the same digest on every run.

Contract:

* the job's own result and errors are jobflow's: a failure propagates and nothing is
  recorded; recording never fails a job that succeeded (it warns, see
  :func:`.warn_not_cached`);
* an entry is written only with all its files stored, and inside :meth:`.Cache.accepting`
  only once jobflow accepted the output (:data:`.HELD`);
* a dynamic job's new jobs are the ones a hit would replay (decoded from the entry's text),
  never the live ones; an output or replay that JSON cannot rebuild is not recorded;
* ``read_only`` (``Call.write`` False): the job runs, nothing is listed, recorded or written.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import types
from collections.abc import Mapping
from typing import Any

import bson
from jobflow import Flow, Job, Response
from monty.json import jsanitize

from jobflow_cache.codec import dumps, gc_paused, job_uuids, loads
from jobflow_cache.entry import CacheEntry, package_versions
from jobflow_cache.errors import CacheError, warn
from jobflow_cache.execution.call import Call, Intercept, Refs
from jobflow_cache.execution.folders import Excludes
from jobflow_cache.execution.lineage import Lineage
from jobflow_cache.execution.options import READ_ONLY_REASON
from jobflow_cache.execution.report import CacheReport, note_run, progress, set_reason
from jobflow_cache.execution.serving import DYNAMIC_PARTS, RESPONSE_PARTS, replayed
from jobflow_cache.execution.session import HELD, StoreSession, warn_not_cached
from jobflow_cache.files import ObjectArea, prehash, snapshot
from jobflow_cache.settings import CacheSettings
from jobflow_cache.store import Outcome

__all__ = ["LARGE_FOLDER", "Recorder"]

logger = logging.getLogger(__name__)

#: Files in a run folder from which on a recorded job warns (once per folder) that listing the
#: folder before and after every job costs time (~10 ms per 1,000 files on a slow disk).
LARGE_FOLDER = 2_000


class Recorder:
    """Runs jobs and records their entries (see the module docstring).

    Parameters
    ----------
    settings
        ``MAX_CANONICAL_INPUT``, ``MAX_FILE_SIZE`` and ``SERVE_CODE_FILES``.
    objects
        The file object area the changed files are stored in.
    excludes
        The patterns left out of a run folder's listing.
    lineage
        Where a job is registered before it runs.
    session
        Where its entry is written.
    report
        Where it is counted as run.
    """

    def __init__(
        self,
        settings: CacheSettings,
        objects: ObjectArea,
        excludes: Excludes,
        lineage: Lineage,
        session: StoreSession,
        report: CacheReport,
    ) -> None:
        self._settings = settings
        self._objects = objects
        self._excludes = excludes
        self._lineage = lineage
        self._session = session
        self._report = report
        self._large_folders: set[str] = set()  # warned about once each

    def run(self, call: Call, outcome: Outcome, reason: str | None = None) -> Any:
        """Run the job and record its entry; ``outcome`` and ``reason`` (a folder conflict,
        refresh) say in its metadata why it ran. With ``call.write`` False (read_only) it
        runs, and nothing is recorded or registered in the store; a dynamic job's new jobs
        are still the decoded ones."""
        job, write = call.job, call.write
        cwd = os.getcwd()  # the physical path (no symlinks), as Path.cwd() gives it
        before = None
        unrecordable: BaseException | None = None
        # listed with FILES=none too: the files the job writes are then recorded by digest
        # only, and a hit takes them from this folder (or runs the job when they changed)
        try:
            # read_only: no files will be recorded, the folder is not listed
            before = snapshot(cwd, self._excludes.of_run_folder(cwd)) if write else None
        except Exception as err:
            # without a snapshot the job's files cannot be told apart: run, record nothing
            # (an entry without its files would later be served incomplete)
            unrecordable = err
        if before is not None:
            self._check_folder_size(cwd, len(before))
            try:  # small files not known yet: their content is the "before" state a hit checks
                prehash(cwd, before)
            except Exception as err:  # only a shortcut: their before-states stay unknown
                logger.debug("could not hash the files of %s: %s", cwd, err)
        digest = call.digest  # hashed before it runs
        # registered before running: a child of a job that fails (OnMissing.PASS/NONE) still
        # sees the same digest in place of its uuid on every run
        self._lineage.register(job, digest, write=write)
        note_run(self._report, job, call.options, digest, outcome)
        reason = reason or (None if write else READ_ONLY_REASON)
        if reason is not None:
            set_reason(job, reason)
        started = time.perf_counter()
        returned = call.run()  # a failure propagates: nothing is recorded
        duration = time.perf_counter() - started
        # the same conversion jobflow applies right after this call (idempotent on a Response)
        response: Response = Response.from_job_returns(returned, job.output_schema)
        if unrecordable is not None:
            warn_not_cached(job, f"its run folder could not be listed: {unrecordable}")
            return response
        try:
            entry, replay = self._make_entry(call, response, cwd, duration)
        except Exception as err:
            if not write:  # read_only: nothing was to be recorded
                logger.debug("%s (read_only) cannot be recorded: %s", job.name, err)
            elif not isinstance(err, CacheError) and _jobflow_rejects(response.output):
                # jobflow fails this job right after we return: its error, not ours, is shown
                logger.debug("output of %s is not serializable: %s", job.name, err)
            else:
                warn_not_cached(job, err, self._session)
            return response
        if replay is not None:
            # the new jobs jobflow runs are the decoded ones, exactly as a hit replays them:
            # objects such as pymatgen Structures are not bit-identical after a JSON round trip,
            # so live objects would give the new jobs other digests than their replays
            response = replayed(response, replay)
        if not write:
            return response
        held = HELD.get()
        if held is None and _jobflow_rejects(response.output):
            # jobflow fails this job right after we return (its JobStore refuses the output):
            # its error, not ours, is shown, and nothing is recorded
            logger.debug("output of %s would not be accepted by jobflow: not cached", job.name)
            return response
        try:
            if before is not None:
                self._record_files(entry, cwd, before, call)
            if held is not None:  # written once jobflow has stored the output (see accepting)
                held.entries.append((self._session, job, entry))
            else:
                self._session.put(entry)  # last: its files are safely stored
        except Exception as err:  # recording must never fail a job that succeeded
            warn_not_cached(job, err, self._session)
        else:
            progress.debug("Cached - %s (%s) as %s", job.name, job.uuid, digest[:12])
        return response

    def _make_entry(
        self, call: Call, response: Response, cwd: str, duration: float
    ) -> tuple[CacheEntry, dict[str, Any] | None]:
        """The entry of a job that ran, and for a dynamic job its response parts as a hit
        replays them (decoded from the entry's text), which jobflow must run instead of the
        live ones.

        The cyclic garbage collector is paused meanwhile (:func:`.gc_paused`): encoding and
        decoding a large output or a response of thousands of jobs allocates a container per
        node, and the collections those allocations trigger walk the whole heap again and
        again (for a response of 10,000 jobs, several times the decode itself).
        """
        with gc_paused():
            return self._entry_of(call, response, cwd, duration)

    def _entry_of(
        self, call: Call, response: Response, cwd: str, duration: float
    ) -> tuple[CacheEntry, dict[str, Any] | None]:
        job, call_digest = call.job, call.call_digest
        assert call_digest is not None
        output = dumps(response.output)
        if '"@module"' in output and _names_lost(json.loads(output)):
            raise CacheError(
                "its output holds objects that JSON cannot rebuild (a class defined inside a "
                "function?): a hit would serve their dicts"
            )
        # None and False (the defaults) are left out: a plain return keeps an empty response
        parts = {
            name: value
            for name in RESPONSE_PARTS
            if (value := getattr(response, name)) is not None and value is not False
        }
        dynamic = any(name in parts for name in DYNAMIC_PARTS)
        response_text = dumps(parts) if parts else ""
        del parts
        replay: dict[str, Any] | None = None
        if dynamic:
            # parsed once: the tree is checked, then decoded (and consumed) into the replay
            tree = json.loads(response_text)
            _check_replayable(job, tree, call.refs)
            replay = loads(response_text, tree)
            del tree
            if _undecoded(replay):
                raise CacheError(
                    "its new jobs hold functions or objects that JSON cannot rebuild (defined "
                    "inside a function?): a hit would hand jobflow their dicts"
                )
        # the canonical input is only decoded when it is kept
        canonical: dict[str, Any] | None = None
        if _encoded_size(call_digest.encodings) <= self._settings.MAX_CANONICAL_INPUT:
            canonical = call_digest.canonical
        entry = CacheEntry(
            digest=call_digest.digest,
            scheme=call_digest.scheme,
            function=call_digest.function,
            name=job.name,
            maker=_maker_of(job),
            cache_version=call_digest.cache_version,
            output=output,
            response=response_text,
            dynamic=dynamic,
            source_uuid=job.uuid,
            source_index=job.index,
            source_dir=cwd,
            input_refs=dict(call.refs.seen),
            # provenance: invalidating or purging one of these cascades to this entry
            consumed=sorted(call.refs.consumed - {call_digest.digest}),
            arg_digests=dict(call_digest.arg_digests),
            canonical_input=canonical,
            versions=package_versions(call_digest.function),
            duration=duration,
        )
        return entry, replay

    def _check_folder_size(self, cwd: str, files: int) -> None:
        """Warn once per folder when a shared run folder is large enough to slow every job."""
        if files < LARGE_FOLDER or cwd in self._large_folders:
            return
        self._large_folders.add(cwd)
        warn(
            f"jobflow-cache: the run folder {cwd} holds {files} files; every recorded job lists "
            "them all twice to find the files it writes. Give each job a folder of its own "
            "(run_locally(create_folders=True)) or set JOBFLOW_CACHE_FILES=none",
            stacklevel=4,
        )

    def _record_files(self, entry: CacheEntry, cwd: str, before: Any, call: Call) -> None:
        """Record what the job changed in ``cwd`` since the snapshot ``before``: every path
        with the state it found and the state it left (:meth:`.ObjectArea.record_changes`).
        Files over MAX_FILE_SIZE, and every file with FILES=none, are recorded by digest only
        (``files_skipped``): a hit takes them from this folder while they are unchanged."""
        after = snapshot(cwd, self._excludes.of_run_folder(cwd))
        records = self._objects.record_changes(
            cwd,
            before,
            after,
            max_size=self._settings.MAX_FILE_SIZE,
            store=call.files != "none",
            serve_code=self._settings.SERVE_CODE_FILES,
        )
        if records:
            entry.files = records
            entry.files_size = sum(r.size for r in records if r.has_object)
            entry.files_skipped = {
                r.path: r.size for r in records if r.kind == "file" and not r.stored
            }


def _check_replayable(job: Job, tree: Any, refs: Refs) -> None:
    """A dynamic response (its parsed JSON ``tree``) may only reference jobs it made, the
    job itself, or known inputs."""
    created, referenced = job_uuids(tree)
    outside = referenced - created - {job.uuid} - set(refs.seen)
    if outside:
        raise CacheError(
            f"its new jobs reference jobs outside their own sub-flow ({sorted(outside)[:3]}), "
            "which a fresh flow would not have"
        )


def _maker_of(job: Job) -> str | None:
    """``module:qualname`` of the class of the instance whose method the job runs (the Maker
    the user made the job with), None for a plain function.

    Not memoised per job: every job is recorded once, so a cache keyed by the job only held
    every recorded ``Job`` (and what it references) for the life of the process, and a
    replaced job (same uuid and hash, another function) compared whole ``__dict__``s."""
    function = job.function
    owner = getattr(function, "__self__", None)
    if owner is None and isinstance(function, Intercept):
        owner = function.instance
    if owner is None or isinstance(owner, (types.ModuleType, type)):
        return None
    cls = type(owner)
    return f"{cls.__module__}:{cls.__qualname__}"


def _encoded_size(encodings: Mapping[str, bytes]) -> int:
    """Length of ``encode(canonical)`` of the canonical input, from its per-argument bytes:
    ``{"name":<bytes>,...}``."""
    commas = max(len(encodings) - 1, 0)
    return 2 + commas + sum(len(name.encode()) + 3 + len(data) for name, data in encodings.items())


def _jobflow_rejects(output: Any) -> bool:
    """True when jobflow cannot store ``output`` in a JobStore (it then fails the job).

    Used where the cache cannot see jobflow store the output (``@cached_job`` under another
    manager; ``run_locally`` records only after jobflow has stored it, see
    :meth:`Cache.accepting`): jobflow's own conversion (``Job.run``: ``jsanitize(strict=True,
    enum_values=True, allow_bson=True)``), then the BSON encoding of MongoDB and mongomock
    (``MemoryStore``, ``JSONStore``), the stores jobflow runs with, which refuse integers
    beyond 64 bits, say. An output only another kind of JobStore would accept is not cached.
    """
    try:
        sanitized = jsanitize(output, strict=True, enum_values=True, allow_bson=True)
        bson.encode({"output": sanitized})
    except Exception:  # AttributeError, TypeError, ValueError, OverflowError, InvalidDocument
        return True
    return False


def _names_lost(tree: Any) -> bool:
    """True when a monty form in the JSON ``tree`` of a job's own output names a class or
    function its module does not hold by that name (monty names a class by ``__name__``, so a
    class defined inside a function): decoding would leave the dict. Checked by name, on the
    modules the objects came from (imported already), without decoding anything."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            module = node.get("@module")
            name = node.get("@class", node.get("@callable"))
            if isinstance(module, str) and isinstance(name, str) and not _held(module, name):
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


@functools.lru_cache(maxsize=4096)
def _held(module: str, name: str) -> bool:
    import sys

    target: Any = sys.modules.get(module)
    if target is None:
        # not imported: monty's decoder would import it; a module that exists holds its names
        import importlib.util

        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            return False
    return True


def _undecoded(value: Any, depth: int = 0) -> bool:
    """True when a decoded replay still holds a monty form (a dict naming ``"@module"`` and
    ``"@class"`` or ``"@callable"``): its class or function could not be imported back."""
    if depth > 200:
        return False
    if isinstance(value, dict):
        if "@module" in value and ("@class" in value or "@callable" in value):
            return True
        return any(_undecoded(item, depth + 1) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_undecoded(item, depth + 1) for item in value)
    if isinstance(value, Job):
        parts = [value.function, value.function_args, value.function_kwargs, value.maker]
        return _undecoded(parts, depth + 1) or not callable(value.function)
    if isinstance(value, Flow):
        return _undecoded(list(value.jobs), depth + 1)
    return False
