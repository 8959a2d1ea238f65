"""Why did a job miss? Its inputs compared field by field with the nearest cached entries.

The inputs come from a cache entry, from a job's record in a JobStore (its ``jobflow_cache``
metadata names its digest and outcome), or from a serialized job, whose digest is computed here
as the executor computes it (so this module sits beside the CLI, after the executor).

Every entry keeps its per-argument sub-digests and, up to ``MAX_CANONICAL_INPUT`` bytes, the
canonical tree of each argument (see :mod:`.hashing.canonical`). Two calls of one function
miss each other exactly where a sub-digest differs; the canonical trees then say which key or
index differs, and how. Tagged nodes are shown readably: ``nan``, ``ndarray(float64, (3, 3),
xxh3 1a2b3c4d)``, ``<uuid of job 3f2c1a9b>``.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import re
import types
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from jobflow import SETTINGS, Flow, Job, JobStore
from jobflow.core.reference import (
    OnMissing,
    find_and_get_references,
    find_and_resolve_references,
)
from monty.json import MontyDecoder, MontyEncoder
from monty.serialization import loadfn

from jobflow_cache.codec import UUID_RE
from jobflow_cache.entry import package_versions
from jobflow_cache.errors import CacheError, StoreUnavailableError
from jobflow_cache.execution.cache import META_KEY, Cache, JobOptions, job_options
from jobflow_cache.hashing.canonical import SCHEME, bind_arguments, encode
from jobflow_cache.hashing.code import code_differences, current_versions, version_differences
from jobflow_cache.store import CacheStore, Outcome, maggma_store_from_spec

__all__ = [
    "MISSING",
    "Comparison",
    "Difference",
    "Inputs",
    "SchemeDifference",
    "compare",
    "diff",
    "job_from_file",
    "job_inputs",
    "job_outcome",
    "nearest",
    "open_job_store",
    "render",
]

logger = logging.getLogger(__name__)

NEAREST_SCAN = 10_000
"""How many of a function's most recent entries :func:`nearest` ranks."""


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


MISSING: Any = _Missing()
"""Stands for a key, index or argument one side of a :class:`Difference` lacks."""

_IDENTIFIER = re.compile(r"[A-Za-z_@][A-Za-z0-9_@]*")


# --------------------------------------------------------------------------- rendering


def _tag_of(node: Any) -> str | None:
    if isinstance(node, dict) and len(node) == 1:
        (key,) = node
        if isinstance(key, str) and key[:1] == "\x00" and key[1:2] != "\x00":
            return key[1:]
    return None


def _key(key: str) -> str:
    return key[1:] if key.startswith("\x00\x00") else key  # an escaped user key


def _render_tag(tag: str, payload: Any) -> str:
    if tag == "float":
        return str(payload)
    if tag == "int":
        return str(int(payload, 16))
    if tag == "bytes":
        return f"bytes({len(payload) // 2} B, {payload[:16]})"
    if tag == "str":
        return f"str(with surrogates, {payload[:16]})"
    if tag == "complex":
        return f"complex({_plain(payload[0])}, {_plain(payload[1])})"
    if tag == "set":
        return "{" + ", ".join(map(_plain, payload)) + "}" if payload else "set()"
    if tag == "dict":
        return "{" + ", ".join(f"{_plain(k)}: {_plain(v)}" for k, v in payload) + "}"
    if tag == "tuple" and isinstance(payload, list):
        return "(" + ", ".join(map(_plain, payload)) + ("," if len(payload) == 1 else "") + ")"
    if tag == "tuple_sub" and isinstance(payload, list) and len(payload) == 2:
        return f"{str(payload[0]).rpartition(':')[2]}{_render_tag('tuple', payload[1])}"
    if tag in ("frozenset", "bytearray"):
        return f"{tag}({_render_tag('set' if tag == 'frozenset' else 'bytes', payload)})"
    if tag == "npscalar" and isinstance(payload, list) and len(payload) == 2:
        return f"numpy {payload[0]} {_plain(payload[1])}"
    if tag in ("datetime", "time") and isinstance(payload, list) and len(payload) == 3:
        wall, _offset, zone = payload
        where = "naive" if zone is None else str(zone[-1]) if isinstance(zone, list) else zone
        return f"{tag}({wall}, {where})"
    if tag == "ndarray":
        dtype, shape, digest = payload
        return f"ndarray({dtype}, {tuple(shape)}, xxh3 {digest[:8]})"
    if tag == "ndarray_items":
        dtype, shape, items = payload
        return f"ndarray({_plain(dtype)}, {tuple(shape)}, {_plain(items)})"
    if tag == "ndarray_sub":
        return f"{payload[0]}({_plain(payload[1])})"
    if tag == "partial":
        return f"partial({_plain(payload[0])}, {_plain(payload[1])}, {_plain(payload[2])})"
    if tag == "hook" and isinstance(payload, list) and len(payload) == 2:
        kind, value = payload
        if kind == "job" and isinstance(value, str):
            return f"<uuid of job {value[:8]}>"
        if kind == "dir" and isinstance(value, list) and len(value) == 2:
            rest = f"/{value[1]}" if value[1] else ""
            return f"<run folder of job {str(value[0])[:8]}>{rest}"
        return f"<{kind} {_plain(value)}>"
    return f"<{tag} {_plain(payload)}>"


def _plain(node: Any) -> str:
    tag = _tag_of(node)
    if tag is not None:
        return _render_tag(tag, node["\x00" + tag])
    if isinstance(node, dict):
        if "@class" in node and "@module" in node:
            fields = [f"{_key(k)}={_plain(v)}" for k, v in node.items() if not k.startswith("@")]
            return f"{node['@class']}({', '.join(fields)})"
        return "{" + ", ".join(f"{_key(k)!r}: {_plain(v)}" for k, v in node.items()) + "}"
    if isinstance(node, list):
        return "[" + ", ".join(map(_plain, node)) + "]"
    return repr(node)


def render(node: Any, width: int = 100) -> str:
    """A readable one-line form of a canonical node, cut at ``width`` characters.

    Examples
    --------
    >>> render({"\\x00float": "nan"}), render({"\\x00hook": ["job", "3f2c1a9b5e"]})
    ('nan', '<uuid of job 3f2c1a9b>')
    >>> render({"@module": "m", "@class": "RelaxMaker", "steps": 10})
    'RelaxMaker(steps=10)'
    """
    if node is MISSING:
        return "(absent)"
    text = _plain(node)
    return text if len(text) <= width else text[: width - 1] + "…"


# --------------------------------------------------------------------------- differences


@dataclasses.dataclass(frozen=True)
class Difference:
    """One differing field: where (``self.steps``, ``structure.sites[3].xyz[0]``), cached and
    now (canonical nodes, or :data:`MISSING`)."""

    path: str
    cached: Any
    now: Any

    def describe(self, width: int = 60) -> str:
        """``path: cached -> now``."""
        return f"{self.path}: {render(self.cached, width)} -> {render(self.now, width)}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (values rendered)."""
        return {"path": self.path, "cached": render(self.cached), "now": render(self.now)}


@dataclasses.dataclass(frozen=True)
class SchemeDifference(Difference):
    """The entry was recorded under another hash scheme (``cached``) than this version's
    (``now``): its digest was computed by other rules, so no call of this version ever finds
    it (a clean miss); ``cachetool purge --outdated`` removes such entries."""

    def describe(self, width: int = 60) -> str:
        """``recorded under hash scheme jfc1 (now jfc2): ...``."""
        return (
            f"recorded under hash scheme {self.cached} (now {self.now}): a clean miss, never "
            "served (purge --outdated removes it)"
        )


def _join(path: str, key: str) -> str:
    key = _key(key)
    return f"{path}.{key}" if _IDENTIFIER.fullmatch(key) else f"{path}[{key!r}]"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        return type(a) is type(b) and encode(a) == encode(b)
    return type(a) is type(b) and a == b


def _walk(a: Any, b: Any, path: str, out: list[Difference]) -> None:
    if _same(a, b):
        return
    if isinstance(a, dict) and isinstance(b, dict) and _tag_of(a) is None and _tag_of(b) is None:
        for key in sorted(set(a) | set(b)):
            _walk(a.get(key, MISSING), b.get(key, MISSING), _join(path, key), out)
        return
    if isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            left = a[i] if i < len(a) else MISSING
            right = b[i] if i < len(b) else MISSING
            _walk(left, right, f"{path}[{i}]", out)
        return
    out.append(Difference(path, a, b))


def diff(cached: Any, now: Any, path: str = "") -> list[Difference]:
    """Field-level differences between two canonical trees (leaves that differ).

    Examples
    --------
    >>> old = {"@module": "m", "@class": "Relax", "steps": 10, "kpts": [4, 4, 4]}
    >>> new = {"@module": "m", "@class": "Relax", "steps": 20, "kpts": [4, 4, 6]}
    >>> [d.describe() for d in diff(old, new, "self")]
    ['self.kpts[2]: 4 -> 6', 'self.steps: 10 -> 20']
    >>> [d.describe() for d in diff(1, 1.0, "a")]  # 1 and 1.0 hash differently
    ['a: 1 -> 1.0']
    """
    out: list[Difference] = []
    _walk(cached, now, path, out)
    return out


# --------------------------------------------------------------------------- comparing calls


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a call hashed: function, cache version, sub-digest and canonical tree per argument.

    ``unresolved`` names arguments still holding output references (their values are unknown)
    with a description of each reference.
    """

    function: str
    cache_version: str | None = None
    arg_digests: Mapping[str, str] = dataclasses.field(default_factory=dict)
    canonical: Mapping[str, Any] | None = None
    digest: str | None = None
    name: str = ""
    created: datetime | None = None
    unresolved: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: the hash scheme of an entry (None: a call hashed now, under :data:`.SCHEME`)
    scheme: str | None = None
    #: package versions: recorded in the entry, or installed now for a call
    versions: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Inputs:
        """The inputs recorded in a cache entry document."""
        canonical = doc.get("canonical_input")
        if isinstance(canonical, str):  # stored as JSON text (see CacheEntry.to_document)
            try:
                canonical = orjson.loads(canonical)
            except orjson.JSONDecodeError:
                canonical = None
        arg_digests = doc.get("arg_digests")
        created = doc.get("created")
        versions = doc.get("versions")
        return cls(
            function=str(doc.get("function", "")),
            cache_version=doc.get("cache_version"),
            arg_digests=arg_digests if isinstance(arg_digests, dict) else {},
            canonical=canonical if isinstance(canonical, dict) else None,
            digest=doc.get("digest"),
            name=str(doc.get("name", "")),
            created=created if isinstance(created, datetime) else None,
            scheme=doc.get("scheme") if isinstance(doc.get("scheme"), str) else None,
            versions=versions if isinstance(versions, dict) else {},
        )


@dataclasses.dataclass
class Comparison:
    """How a cached entry's inputs differ from a call's (see :func:`compare`)."""

    digest: str | None
    name: str
    created: datetime | None
    equal: list[str] = dataclasses.field(default_factory=list)
    changed: list[str] = dataclasses.field(default_factory=list)
    only_now: list[str] = dataclasses.field(default_factory=list)
    only_cached: list[str] = dataclasses.field(default_factory=list)
    unresolved: list[str] = dataclasses.field(default_factory=list)
    cache_version: tuple[str | None, str | None] | None = None
    differences: list[Difference] = dataclasses.field(default_factory=list)
    not_kept: list[str] = dataclasses.field(default_factory=list)
    #: the entry's hash scheme when it is not the current one (it can never be served)
    scheme: str | None = None
    #: what changed in the code parts of the digest (own source, used code, env, version)
    code_notes: list[str] = dataclasses.field(default_factory=list)
    #: packages recorded in the entry under another version than now (``"atomate2 a -> b"``)
    version_notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["created"] = self.created.isoformat() if self.created else None
        data["differences"] = [d.to_dict() for d in self.differences]
        return data


def compare(now: Inputs, cached: Inputs) -> Comparison:
    """Compare a call's inputs with a cached entry's, argument by argument, then field by field.

    Examples
    --------
    >>> cached = Inputs("m:f", arg_digests={"a": "1", "b": "2"}, canonical={"a": 1, "b": [1]})
    >>> now = Inputs("m:f", arg_digests={"a": "1", "b": "3"}, canonical={"a": 1, "b": [2]})
    >>> c = compare(now, cached)
    >>> c.equal, c.changed, [d.describe() for d in c.differences]
    (['a'], ['b'], ['b[0]: 1 -> 2'])
    """
    result = Comparison(cached.digest, cached.name, cached.created)
    if cached.scheme is not None and cached.scheme != SCHEME:
        result.scheme = cached.scheme
        result.differences.append(SchemeDifference("(hash scheme)", cached.scheme, SCHEME))
    if now.cache_version != cached.cache_version:
        result.cache_version = (cached.cache_version, now.cache_version)
        result.code_notes = code_differences(cached.cache_version, now.cache_version)
    if cached.versions:
        now_versions = now.versions or current_versions(cached.versions)
        result.version_notes = version_differences(cached.versions, now_versions)
    names = sorted(set(now.arg_digests) | set(cached.arg_digests) | set(now.unresolved))
    for name in names:
        if name in now.unresolved:
            result.unresolved.append(name)
            continue
        old, new = cached.arg_digests.get(name), now.arg_digests.get(name)
        if old is None:
            result.only_now.append(name)
        elif new is None:
            result.only_cached.append(name)
        elif old == new:
            result.equal.append(name)
        else:
            result.changed.append(name)
            now_tree = (now.canonical or {}).get(name, MISSING)
            cached_tree = (cached.canonical or {}).get(name, MISSING)
            if now_tree is MISSING or cached_tree is MISSING:
                result.not_kept.append(name)
            else:
                result.differences.extend(diff(cached_tree, now_tree, name))
    return result


def nearest(
    cache: CacheStore,
    now: Inputs,
    *,
    exclude: frozenset[str] = frozenset(),
    count: int = 3,
    scan: int = NEAREST_SCAN,
) -> tuple[list[Comparison], int]:
    """The cached entries of ``now.function`` closest to ``now``, compared with it.

    Entries are ranked by the number of arguments with equal sub-digests, then by equal cache
    version, then by equal job name, then by recency; only the ``scan`` most recent entries of
    the function are ranked.

    Returns
    -------
    tuple[list[Comparison], int]
        Up to ``count`` comparisons, best first, and how many entries were ranked.
    """
    scored: list[tuple[int, int, int, int, str]] = []
    ranked = 0
    docs = cache.find(
        {"function": now.function},
        properties=["digest", "arg_digests", "cache_version", "name"],
        sort={"created": -1},
        limit=scan,
    )
    for position, doc in enumerate(docs):
        digest = doc.get("digest")
        if not isinstance(digest, str) or digest in exclude:
            continue
        ranked += 1
        recorded = doc.get("arg_digests")
        recorded = recorded if isinstance(recorded, dict) else {}
        equal = sum(recorded.get(k) == v for k, v in now.arg_digests.items())
        version = int(doc.get("cache_version") == now.cache_version)
        same_name = int(bool(now.name) and doc.get("name") == now.name)
        scored.append((-equal, -version, -same_name, position, digest))
    comparisons = []
    for *_, digest in heapq.nsmallest(count, scored):
        for doc in cache.find({"digest": digest}, limit=1):
            comparisons.append(compare(now, Inputs.from_document(doc)))
    return comparisons, ranked


# --------------------------------------------------------------------------- jobs


def _removed_store_type(spec: Any) -> str | None:
    """``SQLiteStore`` or ``PostgresStore`` (0.1.0's stores, removed since) when a JobStore
    spec names one anywhere, else None."""
    if isinstance(spec, dict):
        for key in ("type", "@class"):
            if spec.get(key) in ("SQLiteStore", "PostgresStore"):
                return str(spec[key])
        spec = list(spec.values())
    if isinstance(spec, list):
        return next((found for item in spec if (found := _removed_store_type(item))), None)
    return None


def open_job_store(spec: Any = None) -> JobStore:
    """A connected JobStore from a loaded spec: jobflow's ``JOB_STORE`` forms (``docs_store`` +
    ``additional_stores``, a serialized JobStore) or a maggma store spec for the docs alone;
    ``None``: jobflow's configured ``JOB_STORE``.
    """
    removed = _removed_store_type(spec)
    if removed is not None:
        raise StoreUnavailableError(
            f"cannot open the JobStore: {removed} was removed after jobflow-cache 0.1.0; keep "
            "a JobStore in maggma's JSONStore (a file, read_only: false) or MongoStore"
        )
    try:
        if spec is None:
            store = SETTINGS.JOB_STORE
        elif isinstance(spec, JobStore):
            store = spec
        elif isinstance(spec, dict) and "docs_store" in spec:
            store = JobStore.from_dict_spec(spec)
        elif isinstance(spec, dict) and spec.get("@class") == "JobStore":
            store = MontyDecoder().process_decoded(spec)
        else:
            store = JobStore(maggma_store_from_spec(spec, "a JobStore's documents store"))
        store.connect()
    except CacheError:
        raise
    except Exception as err:
        raise StoreUnavailableError(f"cannot open the JobStore: {err}") from err
    return store


def job_from_file(path: str, uuid: str | None = None) -> Job:
    """The job of a serialized Job or Flow file (JSON or YAML); ``uuid`` picks one of a flow.

    Raises
    ------
    CacheError
        If the file holds no job, not that uuid, or several jobs and no ``uuid``.
    """
    try:
        loaded = loadfn(path)
    except Exception as err:
        raise CacheError(f"cannot read job file {path}: {err}") from err
    if isinstance(loaded, Job):
        jobs = [loaded]
    elif isinstance(loaded, Flow):
        jobs = [job for job, _ in loaded.iterflow()]
    else:
        raise CacheError(f"{path} holds a {type(loaded).__name__}, not a serialized Job or Flow")
    if uuid is not None:
        jobs = [job for job in jobs if job.uuid == uuid]
        if not jobs:
            raise CacheError(f"no job {uuid} in {path}")
    if len(jobs) > 1:
        names = ", ".join(f"{job.uuid} ({job.name})" for job in jobs[:10])
        raise CacheError(f"{path} holds {len(jobs)} jobs, choose one with --uuid: {names}")
    return jobs[0]


def job_inputs(job: Job, cache: CacheStore, job_store: JobStore | None = None) -> Inputs:
    """What a job's call hashes, computed as the executor does.

    With ``job_store``, output references in the inputs are resolved from it, and upstream job
    uuids in the inputs are replaced by their jobs' digests (from their ``jobflow_cache``
    metadata), as they were in the run. Arguments that still hold references are listed in
    ``unresolved`` and left out; the digest is then unknown (``None``).
    """
    if not callable(job.function):  # its module could not be imported when the JSON was read
        spec = job.function if isinstance(job.function, Mapping) else {}
        where = f"{spec.get('@module', '?')}:{spec.get('@callable', '?')}"
        raise CacheError(
            f"the function of job {job.name!r} ({where}) cannot be imported here"
            + (
                ": it was defined in a script (__main__). Explain the job by its digest "
                "instead (metadata['jobflow_cache']['digest'] in the JobStore, or --jobstore UUID)"
                if spec.get("@module") == "__main__"
                else ""
            )
        )
    args = list(job.function_args)
    kwargs = dict(job.function_kwargs)
    if job_store is not None:  # what Job.run does; references to absent outputs stay
        found: dict[str, Any] = {}
        args = [_resolve(value, job_store, found) for value in args]
        kwargs = {key: _resolve(value, job_store, found) for key, value in kwargs.items()}
    function = job.function
    instance = getattr(function, "__self__", None)
    inner = getattr(function, "original", function)
    base = getattr(inner, "__jobflow_cache__", None)
    if isinstance(base, JobOptions):  # @cached_job: its options and the undecorated function
        inner = getattr(inner, "__wrapped__", inner)
    options = job_options(job, base if isinstance(base, JobOptions) else None)
    if instance is not None and not isinstance(instance, types.ModuleType):
        args.insert(0, instance)
    session = Cache(cache, files="none")
    if job_store is not None:
        uuids = sorted(set(UUID_RE.findall(json.dumps([args, kwargs], cls=MontyEncoder))))
        for doc in job_store.query({"uuid": {"$in": uuids}}, properties=["uuid", "metadata"]):
            meta = (doc.get("metadata") or {}).get(META_KEY) or {}
            if meta.get("digest"):
                session.job_digests[doc["uuid"]] = meta["digest"]
    bound = bind_arguments(inner, args, kwargs, ignore=options.ignore)
    unresolved = {
        name: "; ".join(_describe_reference(ref) for ref in refs)
        for name, value in bound.items()
        if (refs := find_and_get_references(value))
    }
    # a reference's value is unknown: hash None in its place, then leave that argument out
    args = [None if find_and_get_references(value) else value for value in args]
    kwargs = {k: None if find_and_get_references(v) else v for k, v in kwargs.items()}
    call = session.digest(inner, args, kwargs, options)
    keep = [name for name in call.arg_digests if name not in unresolved]
    return Inputs(
        call.function,
        call.cache_version,
        {name: call.arg_digests[name] for name in keep},
        {name: call.canonical[name] for name in keep},
        None if unresolved else call.digest,
        job.name,
        unresolved=unresolved,
        versions=package_versions(call.function),
    )


def _resolve(value: Any, job_store: JobStore, found: dict[str, Any]) -> Any:
    return find_and_resolve_references(value, job_store, cache=found, on_missing=OnMissing.PASS)


def _describe_reference(reference: Any) -> str:
    """``output of job <uuid>['key']`` for a jobflow ``OutputReference``."""
    parts = []
    for kind, value in getattr(reference, "attributes", ()):
        parts.append(f".{value}" if kind == "a" else f"[{value!r}]")
    return f"output of job {reference.uuid}{''.join(parts)}"


def job_outcome(
    uuid: str, cache: CacheStore, job_store: JobStore
) -> tuple[list[str], dict[str, Any] | None]:
    """What the cache did for a job, from its JobStore record, and the entry to explain.

    Returns
    -------
    tuple[list[str], dict | None]
        Lines saying what happened, and the cache entry document the job recorded after it
        ran (a miss, or an entry that could not be served), if there is one.
    """
    doc = job_store.query_one(
        {"uuid": uuid}, properties=["uuid", "index", "name", "metadata"], sort={"index": -1}
    )
    if doc is None:
        raise CacheError(f"no job {uuid} in the JobStore")
    meta = (doc.get("metadata") or {}).get(META_KEY)
    head = f"Job {doc.get('name', '')} ({uuid})"
    if not isinstance(meta, dict) or "outcome" not in meta:
        return [f"{head} ran without jobflow-cache (no {META_KEY} metadata)."], None
    outcome, digest = meta["outcome"], meta.get("digest")
    said = {
        Outcome.HIT.value: f"was served from entry {digest} (recorded by job "
        f"{meta.get('source_uuid', '?')}).",
        Outcome.DISABLED.value: "ran uncached: caching was turned off for it.",
        Outcome.UNCACHEABLE.value: "ran uncached: an input could not be hashed (the run's "
        "CacheWarning names it).",
        Outcome.ERROR.value: "ran uncached: the cache store was unavailable.",
    }
    if outcome == Outcome.HIT.value and digest:
        return [f"{head} {said[outcome]}", *served_version_notes(cache, digest)], None
    if outcome in said or not digest:
        return [f"{head} {said.get(outcome, 'ran uncached.')}"], None
    lines = [f"{head}: {outcome} (digest {digest})."]
    if outcome == Outcome.INVALID.value:
        lines.append("An entry with its digest existed but could not be served.")
    entry = next(iter(cache.find({"digest": digest}, limit=1)), None)
    if entry is None:
        lines.append(
            "No entry has its digest now: the job failed, its result could not be cached, "
            "or the entry was purged."
        )
    else:
        lines.append("It was recorded after it ran; compared with the other entries:")
    return lines, entry


def served_version_notes(cache: CacheStore, digest: str) -> list[str]:
    """Lines saying that entry ``digest`` was recorded under other package versions than the
    ones installed now (empty when they are the same, or the entry is gone).

    Installed code is never hashed (an upgrade of atomate2 does not invalidate its entries), so
    a hit may come from another version of the packages the job's code comes from: this says so.
    """
    try:
        doc = next(iter(cache.find({"digest": digest}, properties=["versions"], limit=1)), None)
    except Exception:  # explaining never fails on a store problem
        return []
    recorded = doc.get("versions") if isinstance(doc, Mapping) else None
    if not isinstance(recorded, dict) or not recorded:
        return []
    notes = version_differences(recorded, current_versions(recorded))
    if not notes:
        return []
    return ["It was recorded under other package versions than now: " + ", ".join(notes) + "."]
