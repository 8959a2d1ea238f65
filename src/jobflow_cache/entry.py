"""The schema of one cache entry: what is kept for one successful job."""

from __future__ import annotations

import base64
import binascii
import functools
import getpass
import logging
import platform
import socket
import sys
import zlib
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import orjson
import xxhash
from pydantic import BaseModel, Field, field_validator

from jobflow_cache.errors import SettingsError, TooLargeError
from jobflow_cache.files import FileRecord
from jobflow_cache.settings import get_settings

__all__ = [
    "CHECKSUM_FIELDS",
    "PACK_MIN",
    "CacheEntry",
    "document_checksum",
    "package_versions",
    "unpack_document",
    "utcnow",
]

logger = logging.getLogger(__name__)

#: Fields covered by an entry's checksum: everything that is served or trusted on a hit.
#: Book-keeping fields (hits, last_hit, valid, invalid_reason) may change and are left out.
CHECKSUM_FIELDS = frozenset(
    {
        "digest",
        "scheme",
        "function",
        "cache_version",
        "output",
        "response",
        "files",
        "source_uuid",
        "source_index",
        "source_dir",
        "input_refs",
        # provenance, not served: sealed so that an altered entry cannot hide the entries
        # that consumed it from a cascading invalidation (it is then invalid, and runs)
        "consumed",
    }
)


#: Text fields stored compressed when longer than :data:`PACK_MIN` characters (see
#: :meth:`CacheEntry.to_document`).
PACKED_FIELDS = ("output", "response")

#: Length from which ``output`` and ``response`` are stored compressed. The embedded SQLite
#: store evaluates each of its indexes on the whole document text whenever a document is
#: written, hit counts included: a dynamic job's response of 10,000 jobs is ~9 MB of JSON,
#: and one hit count on it cost ~0.25 s and ~260 MB of SQLite memory; compressed (~15x
#: smaller) it costs what a small entry does.
PACK_MIN = 64 * 1024

#: Key of the stored document holding the compressed fields: field -> ``"zlib:" + base64``.
PACKED_KEY = "packed"
_ZLIB = "zlib:"


def _pack(text: str) -> str:
    return _ZLIB + base64.b64encode(zlib.compress(text.encode("utf-8"), 1)).decode("ascii")


#: Bytes inflated at a time while a packed field's size is measured.
_INFLATE_CHUNK = 1 << 20


def _inflated_size(data: bytes, limit: int) -> int:
    """Size of ``data`` inflated, counted a chunk at a time without keeping it (memory stays
    at one chunk); raises :class:`TooLargeError` as soon as it passes ``limit``."""
    inflater = zlib.decompressobj()
    size = 0
    chunk = inflater.decompress(data, _INFLATE_CHUNK)
    while True:
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"a packed field inflates to more than {limit} bytes")
        if not inflater.unconsumed_tail:
            break
        chunk = inflater.decompress(inflater.unconsumed_tail, _INFLATE_CHUNK)
    size += len(inflater.flush())
    if size > limit:
        raise TooLargeError(f"a packed field inflates to more than {limit} bytes")
    if not inflater.eof:
        raise ValueError("packed field is truncated")
    return size


def _unpack(blob: Any, limit: int) -> str:
    if not isinstance(blob, str) or not blob.startswith(_ZLIB):
        raise ValueError("packed field of unknown form")
    if (len(blob) - len(_ZLIB)) * 3 // 4 > limit:
        raise TooLargeError(f"a packed field is larger than {limit} bytes")
    try:
        data = base64.b64decode(blob[len(_ZLIB) :], validate=True)
        # measured first, a chunk at a time: a zlib bomb is refused in bounded memory
        size = _inflated_size(data, limit)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data, size + 1)
        return raw.decode()
    except (zlib.error, binascii.Error, UnicodeDecodeError) as err:
        raise ValueError(f"packed field does not decompress: {err}") from err


def _default_limit() -> int:
    try:
        return int(get_settings().MAX_DECODED_SIZE)
    except (SettingsError, AttributeError, TypeError, ValueError):
        return 1 << 30  # the setting's default: a bad setting never lifts the bound


def unpack_document(doc: Mapping[str, Any], limit: int | None = None) -> dict[str, Any]:
    """A stored document with its compressed fields restored (a copy; ``doc`` is unchanged).

    A document written without compressed fields comes back as a shallow copy. Raises
    ``ValueError`` when a compressed field does not decompress (the checksum then decides
    about what it holds, like for any other field), or when ``doc`` is not a mapping (a
    damaged row); :class:`TooLargeError` (a ``ValueError``) when the text fields, once
    decompressed, pass ``limit`` bytes in all (default: ``MAX_DECODED_SIZE``, so every
    reader of a store, ``cachetool`` included, is bounded). Decompression is bounded:
    a field is measured a chunk at a time before it is inflated whole, so a small stored
    field that inflates without end (a zlib bomb) is refused in ~1 MiB of memory.

    Examples
    --------
    >>> e = CacheEntry(digest="d", scheme="jfc1", function="m:f", output="[" + "1," * 40000 + "1]")
    >>> doc = e.to_document()
    >>> doc["output"], sorted(doc["packed"])
    ('', ['output'])
    >>> unpack_document(doc)["output"] == e.output
    True
    """
    if not isinstance(doc, Mapping):  # a damaged row: JSON, but not an object
        raise ValueError(f"not an entry document but {type(doc).__name__}")
    restored = {k: v for k, v in doc.items() if k != PACKED_KEY}
    cap = limit if limit is not None else _default_limit()
    budget = cap
    for name in PACKED_FIELDS:
        text = restored.get(name)
        if isinstance(text, str):
            budget -= len(text)
    if budget < 0:
        raise TooLargeError(f"its text fields are larger than {cap} bytes")
    packed = doc.get(PACKED_KEY)
    if packed is None:
        return restored
    if not isinstance(packed, Mapping):
        raise ValueError("packed fields of unknown form")
    for name, blob in packed.items():
        if name not in PACKED_FIELDS:
            raise ValueError(f"unknown packed field {name!r}")
        text = _unpack(blob, budget)
        budget -= len(text)
        restored[name] = text
    return restored


def utcnow() -> datetime:
    """Timezone-aware current UTC time (entries always store UTC)."""
    return datetime.now(timezone.utc)


def package_versions(function: str = "") -> dict[str, str]:
    """Versions of Python and the packages that matter for an entry's provenance.

    The top-level package of ``function`` (``"atomate2.ase.jobs:..."`` -> atomate2) is included,
    and so are the distributions of the installed code its jobs came from in this process (a
    Maker's class and its bases, installed functions and classes the job's user code uses; see
    :func:`jobflow_cache.hashing.code.packages_of`), under their distribution names. Versions are
    recorded, never hashed: an upgrade does not invalidate the cache by itself.

    Examples
    --------
    >>> sorted(package_versions("jobflow.core.job:store_inputs"))[:2]
    ['jobflow', 'jobflow-cache']
    """
    from jobflow_cache.hashing.code import current_versions, packages_of

    packages = packages_of(function)
    key = (function, packages)
    versions = _PACKAGE_VERSIONS.get(key)
    if versions is None:  # the parts are read once per process too (see _versions)
        versions = dict(_versions(function.split(":", 1)[0].split(".", 1)[0]))
        if packages:
            versions.update(current_versions(packages))
        if len(_PACKAGE_VERSIONS) >= 4096:
            _PACKAGE_VERSIONS.clear()
        _PACKAGE_VERSIONS[key] = versions
    return dict(versions)


#: (function, its packages) -> what :func:`package_versions` found (every entry asks).
_PACKAGE_VERSIONS: dict[tuple[str, tuple[str, ...]], dict[str, str]] = {}


@functools.lru_cache(maxsize=256)
def _versions(top: str) -> tuple[tuple[str, str], ...]:
    # reading package metadata costs ~1 ms a package: once per process and top-level package
    # (an upgrade needs a new process anyway)
    names = {"jobflow", "jobflow-cache", "maggma", "monty", "pymatgen"}
    if top:
        names.add(top)
    versions = {"python": platform.python_version()}
    for name in sorted(names):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return tuple(versions.items())


@functools.cache
def _host() -> str:
    # once per process: getpass.getuser() alone costs ~15 us, on every recorded job
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # getuser fails in some containers without a passwd entry
        return socket.gethostname()


def document_checksum(doc: Mapping[str, Any]) -> str | None:
    """The checksum of a stored entry document's served fields as they are stored, or None
    when a field is missing or not JSON.

    An entry is sealed with the checksum of ``model_dump(mode="json")`` of those fields,
    which is the form they are stored in. When this checksum of the raw fields equals the
    stored one, the fields are exactly those that were sealed, and validating them gives
    the sealed entry back: :meth:`CacheEntry.compute_checksum` would agree. When it differs
    (a document written by another backend with other number types, say), the entry must
    be checked with :meth:`CacheEntry.compute_checksum`, which decides.

    Examples
    --------
    >>> e = CacheEntry(digest="d", scheme="jfc1", function="m:f", output="1").seal()
    >>> document_checksum(e.to_document()) == e.checksum
    True
    """
    try:
        if PACKED_KEY in doc:
            doc = unpack_document(doc)
        data = {name: doc[name] for name in CHECKSUM_FIELDS}
        raw = orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except (KeyError, TypeError, ValueError):
        return None
    return xxhash.xxh3_128(raw).hexdigest()


class CacheEntry(BaseModel):
    """One cached job result, keyed by the digest of its function and resolved inputs.

    The ``output`` is the job's output exactly as jobflow stores it (``jsanitize``d, plain JSON),
    ``response`` holds the rest of the job's :obj:`jobflow.Response` (``replace``/``addition``/
    ``detour`` flows of a dynamic job, ``stop_children``, ``stop_jobflow``, ``stored_data``), and
    ``files`` the manifest of run-folder files kept in the object area.
    """

    digest: str = Field(description="xxh3-128 digest of function + resolved inputs.")
    scheme: str = Field(description="Hash scheme id the digest was made with.")
    function: str = Field(description="Import path 'module:qualname' of the job function.")
    name: str = Field("", description="Name of the job that recorded the entry.")
    maker: str | None = Field(
        None,
        description="'module:qualname' of the class of the Maker the job was made by (its "
        "own class, e.g. EmtRelaxMaker, not the class defining make); None for functions.",
    )
    cache_version: str | None = Field(None, description="User cache_version, if any.")
    output: str = Field(
        "null",
        description="The job output as jobflow stores it (jsanitized), as JSON text written with "
        "monty's encoder: exact for NaN, datetimes and MSON objects on every backend.",
    )
    response: str = Field(
        "",
        description="JSON text of the other Response fields: replace/addition/detour (serialized "
        "flows of a dynamic job), stop_children, stop_jobflow, stored_data. Empty when the job "
        "returned a plain value.",
    )
    dynamic: bool = Field(False, description="True when the job returned new jobs/flows.")
    files: list[FileRecord] = Field(default_factory=list, description="Run-folder manifest.")
    files_size: int = Field(0, description="Total size of the manifest's files in bytes.")
    files_skipped: dict[str, int] = Field(
        default_factory=dict,
        description="Run-folder files the job wrote but the cache did not keep (larger than "
        "MAX_FILE_SIZE, or FILES=none): relative path -> size in bytes. A hit copies them from "
        "the recording folder while they are unchanged there; otherwise the job runs.",
    )
    source_uuid: str = Field("", description="uuid of the job that recorded the entry.")
    source_index: int = Field(1, description="index of the job that recorded the entry.")
    source_dir: str | None = Field(None, description="Run folder the job ran in.")
    input_refs: dict[str, str] = Field(
        default_factory=dict,
        description="Job uuids and run folders seen in the inputs -> digest of the job owning "
        "them; used to rewrite them in the output when the entry is served to a new flow.",
    )
    consumed: list[str] = Field(
        default_factory=list,
        description="Digests of the entries whose results this job consumed (sorted): "
        "upstream jobs named by uuid in its inputs, and jobs whose run folders or files it "
        "was given. Invalidating or purging one of them cascades to this entry.",
    )
    arg_digests: dict[str, str] = Field(
        default_factory=dict, description="Per-argument sub-digests (to explain misses)."
    )
    canonical_input: dict[str, Any] | None = Field(
        None, description="Canonical per-argument input (None when larger than the cap)."
    )
    duration: float = Field(0.0, description="Seconds the job's function took to run.")
    created: datetime = Field(default_factory=utcnow)
    host: str = Field(default_factory=_host, description="user@host that recorded the entry.")
    versions: dict[str, str] = Field(default_factory=dict, description="Package versions.")
    python: str = Field(default_factory=lambda: sys.executable)
    hits: int = Field(0, description="How many times the entry was served.")
    last_hit: datetime | None = None
    valid: bool = Field(True, description="False: kept for inspection, never served.")
    invalid_reason: str | None = None
    checksum: str = Field("", description="xxh3-128 over the served fields (CHECKSUM_FIELDS).")
    signature: str = Field(
        "",
        description="With a group key (JOBFLOW_CACHE_GROUP_KEY): 'hmac-sha256:<key id>:<hex>', "
        "an HMAC-SHA256 over the digest and the checksum, so an entry cannot be altered nor "
        "moved to another digest without the key; empty when written without a key.",
    )

    def compute_checksum(self) -> str:
        """Checksum over the fields that are served or trusted on a hit.

        Examples
        --------
        >>> e = CacheEntry(digest="d", scheme="jfc1", function="m:f", output='{"a": 1}')
        >>> e.compute_checksum() == e.model_copy(update={"hits": 5}).compute_checksum()
        True
        """
        data = self.model_dump(mode="json", include=set(CHECKSUM_FIELDS))
        raw = orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        return xxhash.xxh3_128(raw).hexdigest()

    def seal(self) -> CacheEntry:
        """Set the checksum (call once the entry is complete) and return self."""
        self.checksum = self.compute_checksum()
        return self

    def sealed_document(self) -> dict[str, Any]:
        """Seal the entry and return :meth:`to_document` (one ``model_dump`` for both).

        The checksum is :func:`document_checksum` of the document, which holds the served
        fields in exactly the form :meth:`compute_checksum` hashes.

        Examples
        --------
        >>> e = CacheEntry(digest="d", scheme="jfc1", function="m:f", output='{"a": 1}')
        >>> e.sealed_document()["checksum"] == e.checksum == e.compute_checksum()
        True
        """
        doc = self._document()
        checksum = document_checksum(doc) or self.compute_checksum()
        self.checksum = doc["checksum"] = checksum
        return _packed(doc)

    def to_document(self) -> dict[str, Any]:
        """The document written to the maggma store (JSON-native except datetimes).

        Fields whose keys are not ours are stored in a form every backend accepts:
        ``canonical_input`` as JSON text (its tagged nodes have keys starting with NUL, which
        BSON forbids, and user keys such as ``"$date"`` would be taken for a backend's own
        encoding) and ``files_skipped`` as ``[path, size]`` pairs (file names are arbitrary).
        Neither is covered by the checksum; :meth:`from_document` reads both forms.

        ``output`` and ``response`` longer than :data:`PACK_MIN` characters are stored
        compressed under the key ``"packed"`` (zlib, base64), the fields themselves empty:
        :func:`unpack_document` and :meth:`from_document` restore them, and the checksum is
        over the restored text, exactly as for an entry stored plain. A reader that does not
        know ``"packed"`` finds empty fields that fail the checksum, and runs the job.

        Examples
        --------
        >>> nan = {chr(0) + "float": "nan"}  # a tagged node, see jobflow_cache.hashing.canonical
        >>> e = CacheEntry(digest="d", scheme="jfc1", function="m:f",
        ...                canonical_input={"x": nan}, files_skipped={"$date": 9})
        >>> doc = e.to_document()
        >>> doc["canonical_input"], doc["files_skipped"]
        ('{"x":{"\\\\u0000float":"nan"}}', [['$date', 9]])
        >>> CacheEntry.from_document(doc) == e
        True
        """
        return _packed(self._document())

    def _document(self) -> dict[str, Any]:
        """:meth:`to_document` before its long text fields are compressed.

        ``canonical_input`` is left out of ``model_dump`` and written by orjson alone: it is
        stored as that text anyway, and pydantic's walk of a ``dict[str, Any]`` (a value's
        type found per node) cost several times the rest of the dump for an input of a
        kilobyte (about 40 us against 10). The keys keep the model's order."""
        dumped = self.model_dump(mode="json", exclude=_DUMPED_APART)
        canonical = self.canonical_input
        dumped["canonical_input"] = None if canonical is None else orjson.dumps(canonical).decode()
        doc = {name: dumped[name] for name in _FIELD_ORDER}
        doc["created"] = self.created
        doc["last_hit"] = self.last_hit
        doc["files_skipped"] = [[path, size] for path, size in self.files_skipped.items()]
        return doc

    @field_validator("canonical_input", mode="before")
    @classmethod
    def _canonical_from_text(cls, value: Any) -> Any:
        return orjson.loads(value) if isinstance(value, (str, bytes)) else value

    @field_validator("files_skipped", mode="before")
    @classmethod
    def _skipped_from_pairs(cls, value: Any) -> Any:
        return dict(value) if isinstance(value, list) else value

    @classmethod
    def from_document(cls, doc: dict[str, Any], *, unpacked: bool = False) -> CacheEntry:
        """Parse a store document (raises ``pydantic.ValidationError`` when malformed, and
        ``ValueError`` when a compressed field does not decompress). With ``unpacked``,
        ``doc`` is what :func:`unpack_document` returned (a copy the caller gives away, its
        size already bounded): it is used as it is, not restored, measured and copied again."""
        doc = doc if unpacked else unpack_document(doc)
        doc.pop("_id", None)
        return cls.model_validate(doc)


#: Fields :meth:`CacheEntry._document` writes itself rather than through ``model_dump``.
_DUMPED_APART: set[str] = {"canonical_input"}  # (never changed)
#: The entry's fields in the model's order (the order of a document's keys).
_FIELD_ORDER = tuple(CacheEntry.model_fields)


def _packed(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its text fields longer than :data:`PACK_MIN` compressed (in place)."""
    packed = {
        name: _pack(text)
        for name in PACKED_FIELDS
        if isinstance(text := doc.get(name), str) and len(text) > PACK_MIN
    }
    if packed:
        doc.update(dict.fromkeys(packed, ""))
        doc[PACKED_KEY] = packed
    return doc
