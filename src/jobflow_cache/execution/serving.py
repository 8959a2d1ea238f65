"""Serving a hit: the cached ``Response`` of an entry, replayed for the job at hand.

:meth:`Server.serve` turns an entry into the :obj:`~jobflow.Response` the job's function
would have returned here: its run-folder files placed in the job's folder (checked first:
nothing is overwritten or hidden), the recorded job's uuid, its run folder and those of its
upstream jobs rewritten to this call's (:attr:`.Refs.seen` against ``input_refs``), new uuids
for the jobs a dynamic response makes, and jobflow's own schema check. A served job is counted
and marked (:func:`.note_hit`), registered in the lineage, and its hit counted in the store.

Contract: serving never fails a job. An entry that cannot be served gives :class:`NotServed`
(with a warning, the job then runs: an invalid entry); serving that would overwrite work in
the run folder gives :class:`NotServed` with the conflict (the job runs as a miss).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobflow import Flow, Job, OutputReference, Response
from jobflow.utils.uid import suid

from jobflow_cache.codec import (
    UUID_RE,
    DirRewrite,
    created_uuids,
    loads,
    parse,
    rewrite_text,
)
from jobflow_cache.entry import CacheEntry
from jobflow_cache.errors import FilesUnavailableError, FolderConflictError, warn
from jobflow_cache.execution.call import Call
from jobflow_cache.execution.lineage import Lineage
from jobflow_cache.execution.options import FilesMode
from jobflow_cache.execution.report import CacheReport, note_hit, progress
from jobflow_cache.execution.session import StoreSession
from jobflow_cache.files import ObjectArea, PlaceMode

__all__ = [
    "DYNAMIC_PARTS",
    "RESPONSE_PARTS",
    "NotServed",
    "Server",
    "replayed",
    "this_host",
]

logger = logging.getLogger(__name__)

#: The Response fields besides ``output`` that an entry keeps; the first three make new jobs.
DYNAMIC_PARTS = ("replace", "addition", "detour")
RESPONSE_PARTS = (*DYNAMIC_PARTS, "stored_data", "stop_children", "stop_jobflow")


@dataclass(frozen=True)
class NotServed:
    """A hit that was not served: the job runs.

    ``conflict`` says why when serving would have overwritten or hidden work in the run
    folder (the job runs as a miss); None when the entry could not be served (invalid).
    """

    conflict: str | None = None


class Server:
    """Serves hits into jobs (see the module docstring).

    Parameters
    ----------
    objects
        The file object area the entries' files are placed from.
    lineage
        Where a served job is registered.
    session
        Where its hit is counted.
    report
        Where it is counted as served.
    exclusive_dirs
        Whether the current job's run folder is its own (then large files may be linked).
    """

    def __init__(
        self,
        objects: ObjectArea,
        lineage: Lineage,
        session: StoreSession,
        report: CacheReport,
        exclusive_dirs: Callable[[], bool],
    ) -> None:
        self._objects = objects
        self._lineage = lineage
        self._session = session
        self._report = report
        self._exclusive_dirs = exclusive_dirs

    def serve(self, call: Call, entry: CacheEntry) -> Response | NotServed:
        """Serve ``entry`` to ``call``'s job, or say why not (with a warning, or the conflict)."""
        job = call.job
        digest = entry.digest
        try:
            response = self._replay(call, entry)
        except FolderConflictError as err:  # not a cache problem: the job runs (a miss)
            progress.info(
                "Not served - %s (%s) <- %s: %s; running it", job.name, job.uuid, digest[:12], err
            )
            return NotServed(str(err))
        except Exception as err:  # whatever goes wrong, the job runs instead
            warn(
                f"jobflow-cache: cached entry {digest[:12]} of job {job.name!r} cannot be "
                f"served ({err}); running the job",
                stacklevel=3,
            )
            return NotServed()
        self._lineage.register(job, digest, write=call.write)
        note_hit(self._report, job, call.options, entry)
        progress.info(
            "Served from cache - %s (%s) <- %s, %.1f s saved",
            job.name,
            job.uuid,
            digest[:12],
            entry.duration,
        )
        try:
            if call.write:  # read_only: not even a hit count
                self._session.record_hit(digest)
        except Exception as err:  # bookkeeping only: never fail a served job
            logger.warning("could not record hit of %s: %s", digest[:12], err)
        return response

    def place_mode(self, mode: FilesMode) -> PlaceMode:
        """How a hit places files: independent copies (reflinks where the file system has
        them), except with the opt-in FILES=link where each job has a folder of its own:
        then files of at least ``files.LINK_MIN_SIZE`` are read-only hard links to their
        object (never as root). In a folder shared by several jobs, a later job may rewrite
        a file in place (two VASP jobs writing OUTCAR), which a read-only link would make
        fail (EACCES). Recording never links: the user's files keep their inode and mode."""
        return "link" if mode == "link" and self._exclusive_dirs() else "copy"

    def _replay(self, call: Call, entry: CacheEntry) -> Response:
        job = call.job
        cwd = os.getcwd()
        # an entry recorded with files gets them back whatever this job's mode: its output may
        # name them (FILES=none only means "record no files"); without them it is not served
        place = self.place_mode(call.files)
        if entry.files and not self._objects.has_all(entry.files):
            raise FilesUnavailableError("run-folder files of the entry are missing or corrupt")
        uuids: dict[str, str] = {}
        dirs: dict[str, DirRewrite] = {}
        if entry.source_uuid and entry.source_uuid != job.uuid:
            uuids[entry.source_uuid] = job.uuid
        hosts = (entry.host.rpartition("@")[2], this_host())
        if entry.source_dir and entry.source_dir != cwd:
            # the folder itself and the files the job wrote; other paths that happen to lie in
            # it (inputs, in a shared folder) are not the job's and keep pointing where they did
            dirs[entry.source_dir] = DirRewrite(cwd, _manifest_paths(entry), hosts)
        # a job's uuid and its folder map to the same digest: keep the two kinds apart; twin
        # upstream jobs have keys of their own (see Refs), so each keeps its uuid and folder
        now_uuid: dict[str, str] = {}
        now_dir: dict[str, str] = {}
        for literal, key in call.refs.seen.items():
            (now_uuid if UUID_RE.fullmatch(literal) else now_dir)[key] = literal
        for old, key in entry.input_refs.items():
            if UUID_RE.fullmatch(old):
                new = now_uuid.get(key)
                if new is not None and new != old:
                    uuids[old] = new
            else:  # an upstream job's run folder: all of it moved
                new = now_dir.get(key)
                if new is not None and new != old:
                    dirs.setdefault(old, DirRewrite(new, None, hosts))
        parts: dict[str, Any] = {}
        if entry.response:
            text = entry.response
            if entry.dynamic:
                created = created_uuids(parse(text)) - {entry.source_uuid}
                uuids = {**uuids, **{old: suid() for old in created}}
            parts = loads(rewrite_text(text, uuids, dirs))
        output = loads(rewrite_text(entry.output, uuids, dirs))
        if entry.files:
            # checks the whole folder first: raises FolderConflictError (the job runs) where
            # serving would overwrite or hide work, before anything is changed
            self._objects.materialize(
                entry.files, Path(cwd), mode=place, source_dir=entry.source_dir
            )
        # the schema check jobflow applies to the function's return value
        return Response.from_job_returns(
            replayed(Response(output=output), parts), job.output_schema
        )


def this_host() -> str:
    """This machine's host name."""
    return socket.gethostname()


def _manifest_paths(entry: CacheEntry) -> frozenset[str]:
    """Relative paths of the entry's files and of the folders holding them."""
    paths: set[str] = set()
    for record in entry.files:
        parts = record.path.split("/")
        paths.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return frozenset(paths)


def replayed(response: Response, parts: Mapping[str, Any]) -> Response:
    """A Response with ``response``'s output and the other fields taken from ``parts``."""
    kept = {k: parts[k] for k in RESPONSE_PARTS if k in parts}
    for name in DYNAMIC_PARTS:
        if name in kept:
            _reference_tuples(kept[name], 0)
    return Response(output=response.output, job_dir=response.job_dir, **kept)


def _reference_tuples(node: Any, depth: int) -> None:
    """Give the references in decoded new jobs the tuples jobflow's live ones hold.

    ``OutputReference`` has no ``from_dict``: monty rebuilds its ``attributes`` (``(("a",
    "energy"),)``) as lists, and references then compare unequal to the live ones, which
    ``run_locally`` returns on a miss without the cache. Walks flows, jobs, their arguments
    and outputs, lists and dicts (bounded in depth, as a flow's nesting is).
    """
    if depth > 64:
        return
    if isinstance(node, OutputReference):
        if not isinstance(node.attributes, tuple) or any(
            not isinstance(a, tuple) for a in node.attributes
        ):
            node.attributes = tuple(tuple(a) for a in node.attributes)
    elif isinstance(node, Flow):
        _reference_tuples(node.jobs, depth + 1)
        _reference_tuples(node.output, depth + 1)
    elif isinstance(node, Job):
        _reference_tuples(node.function_args, depth + 1)
        _reference_tuples(node.function_kwargs, depth + 1)
    elif isinstance(node, list | tuple):
        for item in node:
            _reference_tuples(item, depth + 1)
    elif isinstance(node, dict):
        for item in node.values():
            _reference_tuples(item, depth + 1)
