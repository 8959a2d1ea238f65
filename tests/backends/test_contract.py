"""The behaviour every :class:`~jobflow_cache.backends.base.EntryBackend` shares.

Each test runs on every backend of tests/backends/conftest.py (``sqlite``, ``memory``,
``mongo``, ``pgbackend``) with real entry documents
(:meth:`.CacheEntry.sealed_document`), and selects with the criteria the command line builds
(:meth:`.Filters.criteria`), so ``cachetool ls/stats/invalidate/purge`` select the same
entries whatever the backend.

Datetimes are compared at millisecond precision, as naive UTC (MongoDB keeps milliseconds;
a backend may give back aware or naive-UTC values).
"""

from __future__ import annotations

import copy
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from jobflow_cache import SCHEME
from jobflow_cache.admin.listing import Filters
from jobflow_cache.backends.base import (
    EXPLAIN_FIELDS,
    Coordinator,
    EntryBackend,
    Totals,
)
from jobflow_cache.entry import PACK_MIN, PACKED_KEY, CacheEntry
from jobflow_cache.files import FileRecord, FileState

UTC = timezone.utc
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
#: Whole milliseconds: selection bounds equal to a stored date stay exact on MongoDB too.
T0 = datetime(2024, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)


# --------------------------------------------------------------------------- documents


def digest_of(label: str) -> str:
    """A 32-hex digest starting with ``label`` (hex) and padded with a fixed pattern."""
    return (label + "0123456789abcdef" * 2)[:32]


def files_manifest(n: int, base: int = 1000) -> list[FileRecord]:
    records = [
        FileRecord(
            path=f"données/OUTCAR.{i}",
            size=base + i,
            xxh3=f"{i:032x}",
            mode=0o644,
            before=FileState(size=7, xxh3="f" * 32) if i == 0 else None,
        )
        for i in range(n)
    ]
    if n:
        records.append(FileRecord(path="link", kind="symlink", target="../POSCAR"))
        records.append(FileRecord(path="scratch", kind="dir"))
    return records


def make_doc(
    digest: str,
    *,
    name: str = "relax_si",
    function: str = "tests.jobs:relax",
    created: datetime = T0,
    hits: int = 0,
    last_hit: datetime | None = None,
    duration: float = 1.0,
    valid: bool = True,
    invalid_reason: str | None = None,
    consumed: list[str] | None = None,
    n_files: int = 0,
    host: str = "alice@node01",
    output: str = '{"energy": -10.25, "label": "Si\\u2014\\u03b1"}',
    **kwargs: Any,
) -> dict[str, Any]:
    """A realistic, sealed entry document (unsigned)."""
    files = files_manifest(n_files)
    entry = CacheEntry(
        digest=digest,
        scheme=SCHEME,
        function=function,
        name=name,
        output=output,
        files=files,
        files_size=sum(f.size for f in files),
        files_skipped={"WAVECAR": 5_000_000_000} if n_files else {},
        source_uuid=str(uuid.UUID(int=int(digest, 16))),
        source_index=1,
        source_dir=f"/scratch/runs/launcher_{digest[:8]}",
        input_refs={str(uuid.UUID(int=7)): digest_of("77")},
        consumed=sorted(consumed or []),
        arg_digests={"structure": "1" * 32, "kpoints": "2" * 32},
        canonical_input={"structure": {"sites": [1, 2]}, "kpoints": 4},
        duration=duration,
        created=created,
        host=host,
        versions={"jobflow": "0.1.18", "pymatgen": "2024.3.1"},
        python="/usr/bin/python3",
        hits=hits,
        last_hit=last_hit,
        valid=valid,
        invalid_reason=invalid_reason,
        **kwargs,
    )
    doc = entry.sealed_document()
    doc["signature"] = ""
    return doc


def large_output(seed: int = 0, n: int = 8000) -> str:
    rng = random.Random(seed)
    return json.dumps([rng.random() for _ in range(n)])


A = digest_of("ab01")
B = digest_of("ab02")
C = digest_of("c3")
D = digest_of("d4")
E = digest_of("e5")
ABSENT = digest_of("ff")


def known_set() -> dict[str, dict[str, Any]]:
    """Five entries with distinct creation dates and hit counts (see each line)."""
    docs = [
        # relax, valid, served 3 times, last one day after it was made
        make_doc(A, hits=3, last_hit=T0 + DAY, duration=2.5, n_files=2),
        # relax, invalid, never served, consumed A
        make_doc(
            B,
            name="relax_ge",
            created=T0 + DAY,
            duration=10.0,
            valid=False,
            invalid_reason="code changed",
            consumed=[A],
        ),
        # static (a Maker's), valid, large packed output, consumed A and B
        make_doc(
            C,
            name="static",
            function="tests.jobs:static",
            maker="atomate2.vasp.jobs.core:StaticMaker",
            cache_version="v2",
            created=T0 + 2 * DAY,
            hits=5,
            last_hit=T0 + 5 * DAY,
            duration=1.5,
            output=large_output(),
            consumed=[B, A],
        ),
        # relax, invalid, served once
        make_doc(
            D,
            name="relax_big",
            created=T0 + 3 * DAY,
            hits=1,
            last_hit=T0 + 3 * DAY + HOUR,
            duration=100.0,
            valid=False,
            invalid_reason="marked by hand",
            n_files=1,
        ),
        # band, valid, served twice, from another host
        make_doc(
            E,
            name="band",
            function="tests.jobs:band",
            created=T0 + 4 * DAY,
            hits=2,
            last_hit=T0 + 4 * DAY + HOUR,
            duration=0.25,
            host="bob@node02",
        ),
    ]
    return {doc["digest"]: doc for doc in docs}


def write(backend: EntryBackend, docs: Mapping[str, dict[str, Any]] | list[dict[str, Any]]):
    """Write copies (a backend may not change what its caller holds: this never tells)."""
    values = list(docs.values()) if isinstance(docs, Mapping) else docs
    backend.write(copy.deepcopy(values))


@pytest.fixture
def known(backend: EntryBackend) -> dict[str, dict[str, Any]]:
    """The backend holding :func:`known_set`; returns the documents written."""
    docs = known_set()
    write(backend, docs)
    return docs


# --------------------------------------------------------------------------- comparisons


def ms(value: datetime) -> datetime:
    """Naive UTC at millisecond precision."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def normal(value: Any) -> Any:
    """``value`` with datetimes as :func:`ms` and any ``_id`` dropped (recursively)."""
    if isinstance(value, datetime):
        return ms(value)
    if isinstance(value, Mapping):
        return {k: normal(v) for k, v in value.items() if k != "_id"}
    if isinstance(value, list | tuple):
        return [normal(v) for v in value]
    return value


def digests(docs: Any) -> list[str]:
    return [doc["digest"] for doc in docs]


def selected(backend: EntryBackend, criteria: Any) -> set[str]:
    return set(digests(backend.select(criteria)))


# --------------------------------------------------------------------------- identity


def test_is_an_entry_backend(backend: EntryBackend) -> None:
    assert isinstance(backend, EntryBackend)


def test_name_and_thread_safety_are_declared(
    backend: EntryBackend, owned_file: Path | None
) -> None:
    assert isinstance(backend.name, str)
    assert backend.name.strip()
    if owned_file is not None:  # messages name the file (sqlite:///path...)
        assert str(owned_file) in backend.name
    assert isinstance(backend.thread_safe, bool)


def test_owned_paths(backend: EntryBackend, owned_file: Path | None) -> None:
    paths = backend.owned_paths()
    assert isinstance(paths, list)
    assert all(isinstance(p, str) and Path(p).is_absolute() for p in paths), paths
    if owned_file is not None:
        assert owned_file.resolve() in {Path(p).resolve() for p in paths}, paths
    else:  # a server's (or a process's memory) data: no file on this machine is the backend's
        assert paths == []


def test_close_twice_is_harmless(backend: EntryBackend) -> None:
    write(backend, [make_doc(A)])
    backend.close()
    backend.close()  # (and the fixture closes it once more)


def test_connect_again_keeps_the_entries(backend: EntryBackend) -> None:
    doc = make_doc(A)
    write(backend, [doc])
    backend.connect()  # idempotent
    assert normal(backend.read(A)) == normal(doc)


# --------------------------------------------------------------------------- read / write


def test_round_trip_of_entry_documents(backend: EntryBackend) -> None:
    docs = known_set()
    # microseconds: a backend may keep only milliseconds (MongoDB)
    docs[A]["created"] = T0 + timedelta(microseconds=456)
    write(backend, docs)
    for digest, doc in docs.items():
        got = backend.read(digest)
        assert got is not None, digest
        assert normal(got) == normal(doc), digest


def test_round_trip_keeps_datetimes_as_datetimes(backend: EntryBackend) -> None:
    doc = make_doc(A, hits=1, last_hit=T0 + HOUR)
    write(backend, [doc])
    got = backend.read(A)
    assert got is not None
    for key in ("created", "last_hit"):
        assert isinstance(got[key], datetime), (key, got[key])
        assert ms(got[key]) == ms(doc[key])
    assert got["last_hit"] is not None


def test_large_output_is_packed_and_comes_back_whole(backend: EntryBackend) -> None:
    output = large_output(seed=3)
    assert len(output) > PACK_MIN
    doc = make_doc(C, output=output)
    assert PACKED_KEY in doc
    assert doc["output"] == ""
    write(backend, [doc])
    got = backend.read(C)
    assert got is not None
    assert normal(got) == normal(doc)
    entry = CacheEntry.from_document(got)
    assert entry.output == output
    assert entry.compute_checksum() == got["checksum"]


def test_read_without_explain_leaves_out_the_explain_fields(backend: EntryBackend) -> None:
    doc = make_doc(A, n_files=2)
    assert all(doc[key] for key in EXPLAIN_FIELDS)
    write(backend, [doc])
    got = backend.read(A, explain=False)
    assert got is not None
    assert not set(EXPLAIN_FIELDS) & set(got), sorted(got)
    expected = {k: v for k, v in doc.items() if k not in EXPLAIN_FIELDS}
    assert normal(got) == normal(expected)
    # and the full read still has them
    full = backend.read(A)
    assert full is not None
    assert {k: full[k] for k in EXPLAIN_FIELDS} == {k: doc[k] for k in EXPLAIN_FIELDS}


def test_read_of_an_absent_digest_is_none(backend: EntryBackend) -> None:
    assert backend.read(ABSENT) is None
    write(backend, [make_doc(A)])
    assert backend.read(ABSENT) is None
    assert backend.read(ABSENT, explain=False) is None


def test_rewrite_replaces_the_whole_document(backend: EntryBackend) -> None:
    old = make_doc(C, output=large_output(seed=1), hits=4, last_hit=T0 + DAY, n_files=3)
    write(backend, [old])
    new = make_doc(C, name="static_again", output='{"small": true}')
    assert PACKED_KEY in old
    assert PACKED_KEY not in new
    write(backend, [new])
    got = backend.read(C)
    assert got is not None
    assert PACKED_KEY not in got  # replaced, not merged
    assert normal(got) == normal(new)
    assert backend.count() == 1


def test_write_many_at_once(backend: EntryBackend) -> None:
    docs = [
        make_doc(f"{i:04x}" + "5" * 28, name=f"job_{i}", created=T0 + i * HOUR, hits=i % 3)
        for i in range(120)
    ]
    write(backend, docs)
    assert backend.count() == 120
    assert set(digests(backend.select())) == {d["digest"] for d in docs}
    for doc in (docs[0], docs[57], docs[-1]):
        assert normal(backend.read(doc["digest"])) == normal(doc)


def test_write_of_one_digest_twice_keeps_the_last(backend: EntryBackend) -> None:
    first, second = make_doc(A, name="first"), make_doc(A, name="second", hits=2)
    write(backend, [first, second])
    assert backend.count() == 1
    assert normal(backend.read(A)) == normal(second)


def test_write_of_nothing_is_harmless(backend: EntryBackend) -> None:
    backend.write([])
    assert backend.count() == 0
    assert list(backend.select()) == []


# --------------------------------------------------------------------------- count / select

UNUSED_CUTOFF = T0 + 3 * DAY  # A (last hit T0+1d) and B (never served, made T0+1d) only

CRITERIA: list[tuple[str, dict[str, Any] | None, set[str]]] = [
    ("none", None, {A, B, C, D, E}),
    ("empty", {}, {A, B, C, D, E}),
    ("equal-name", {"name": "relax_si"}, {A}),
    ("equal-function", {"function": "tests.jobs:relax"}, {A, B, D}),
    ("equal-digest", {"digest": C}, {C}),
    ("eq-operator", {"host": {"$eq": "bob@node02"}}, {E}),
    ("equal-none", {"cache_version": None}, {A, B, D, E}),
    ("equal-none-maker", {"maker": None}, {A, B, D, E}),
    ("ne-none", {"maker": {"$ne": None}}, {C}),
    ("ne", {"name": {"$ne": "static"}}, {A, B, D, E}),
    ("in", {"digest": {"$in": [A, C, ABSENT]}}, {A, C}),
    ("in-empty", {"digest": {"$in": []}}, set()),
    ("nin", {"function": {"$nin": ["tests.jobs:relax", "nope:x"]}}, {C, E}),
    ("regex-prefix", {"digest": {"$regex": "^ab"}}, {A, B}),
    ("regex-searched", {"name": {"$regex": "lax"}}, {A, B, D}),
    ("regex-end", {"name": {"$regex": "_ge$"}}, {B}),
    ("regex-options-i", {"name": {"$regex": "LAX", "$options": "i"}}, {A, B, D}),
    ("regex-no-options-is-case-sensitive", {"name": {"$regex": "LAX"}}, set()),
    # an anchored literal prefix with "i" is no range of the unique index
    ("regex-prefix-options-i", {"digest": {"$regex": "^AB", "$options": "i"}}, {A, B}),
    ("regex-prefix-upper", {"digest": {"$regex": "^AB"}}, set()),
    ("regex-prefix-options-empty", {"digest": {"$regex": "^ab", "$options": ""}}, {A, B}),
    ("created-range", {"created": {"$gte": T0 + DAY, "$lt": T0 + 3 * DAY}}, {B, C}),
    ("created-gt-lte", {"created": {"$gt": T0 + DAY, "$lte": T0 + 3 * DAY}}, {C, D}),
    (
        "created-naive-utc",
        {"created": {"$gte": (T0 + DAY).replace(tzinfo=None)}},
        {B, C, D, E},
    ),
    (
        "created-other-zone",
        {"created": {"$lt": (T0 + DAY).astimezone(timezone(timedelta(hours=-5)))}},
        {A},
    ),
    ("last-hit-none", {"last_hit": None}, {B}),
    ("last-hit-after", {"last_hit": {"$gte": T0 + 3 * DAY}}, {C, D, E}),
    ("valid-false", {"valid": False}, {B, D}),
    ("valid-true", {"valid": True}, {A, C, E}),
    ("invalid-reason", {"invalid_reason": "code changed"}, {B}),
    ("hits-gt", {"hits": {"$gt": 1}}, {A, C, E}),
    ("hits-range", {"hits": {"$gte": 1, "$lte": 3}}, {A, D, E}),
    ("hits-zero", {"hits": 0}, {B}),
    ("duration-float", {"duration": {"$gte": 2.5}}, {A, B, D}),
    ("files-size", {"files_size": {"$gt": 0}}, {A, D}),
    ("exists-digest", {"digest": {"$exists": True}}, {A, B, C, D, E}),
    # a sealed document holds every field, null or not: a null field exists
    ("exists-null-field", {"maker": {"$exists": True}}, {A, B, C, D, E}),
    ("not-exists-null-field", {"invalid_reason": {"$exists": False}}, set()),
    ("in-with-none", {"maker": {"$in": [None, "x:Y"]}}, {A, B, D, E}),
    ("source-uuid", {"source_uuid": str(uuid.UUID(int=int(E, 16)))}, {E}),
    ("or", {"$or": [{"name": "static"}, {"hits": 0}]}, {B, C}),
    (
        "and",
        {"$and": [{"function": "tests.jobs:relax"}, {"valid": True}]},
        {A},
    ),
    (
        "or-unused-since-shape",
        {
            "$or": [
                {"last_hit": {"$lt": UNUSED_CUTOFF}},
                {"last_hit": None, "created": {"$lt": UNUSED_CUTOFF}},
            ]
        },
        {A, B},
    ),
    ("nor", {"$nor": [{"valid": False}, {"hits": 0}]}, {A, C, E}),
    ("or-in-and", {"$and": [{"$or": [{"hits": 0}, {"hits": 5}]}, {"valid": True}]}, {C}),
    ("no-match", {"name": "nothing"}, set()),
    # the command line's selections (cachetool ls/stats/invalidate/purge)
    ("cli-name-glob", Filters(name="relax*").criteria(), {A, B, D}),
    ("cli-name-exact", Filters(name="relax_ge").criteria(), {B}),
    ("cli-name-question", Filters(name="relax_??").criteria(), {A, B}),
    ("cli-function-glob", Filters(function="*:re*").criteria(), {A, B, D}),
    ("cli-function-question", Filters(function="tests?jobs:ba??").criteria(), {E}),
    ("cli-function-dot-is-literal", Filters(function="tests.jobs:s.ati*").criteria(), set()),
    ("cli-invalid", Filters(invalid=True).criteria(), {B, D}),
    ("cli-valid", Filters(invalid=False).criteria(), {A, C, E}),
    ("cli-name-invalid", Filters(name="relax*", invalid=True).criteria(), {B, D}),
    ("cli-since", Filters(since=T0 + 2 * DAY).criteria(), {C, D, E}),
    ("cli-since-before", Filters(since=T0 + DAY, before=T0 + 3 * DAY).criteria(), {B, C}),
    ("cli-unused-since", Filters(unused_since=UNUSED_CUTOFF).criteria(), {A, B}),
    (
        "cli-unused-since-later",
        Filters(unused_since=T0 + 4 * DAY + 2 * HOUR).criteria(),
        {A, B, D, E},
    ),
    (
        "cli-combined",
        Filters(
            name="relax*", invalid=True, since=T0, unused_since=T0 + 3 * DAY + 12 * HOUR
        ).criteria(),
        {B, D},
    ),
    ("cli-digests", Filters(digests=(A, E, ABSENT)).criteria(), {A, E}),
    ("cli-everything", Filters().criteria(), {A, B, C, D, E}),
]


@pytest.mark.parametrize(
    ("criteria", "expected"),
    [pytest.param(c, e, id=i) for i, c, e in CRITERIA],
)
def test_select_and_count_with_criteria(
    backend: EntryBackend, known: dict, criteria: Any, expected: set[str]
) -> None:
    given = copy.deepcopy(criteria)
    assert selected(backend, given) == expected
    assert backend.count(given) == len(expected)
    assert given == criteria  # the caller's criteria are left as they were


#: Names that tell the flags of ``$options`` apart: case, lines, newlines for ``.``, a
#: non-ASCII letter. (The non-ASCII letters Python's IGNORECASE takes for ASCII ones, such as
#: the Kelvin sign for k, are left to tests/backends/test_postgres_backend.py: a MongoDB
#: server's PCRE need not fold them as Python does.)
OPTION_NAMES = [
    "relax_si",
    "Relax_Ge",
    "RELAX",
    "static\nrelax",
    "static\nRelax\n",
    "re\nlax",
    "kpoints",
    "Ion",
    "\u00e9t\u00e9",
]

OPTION_CRITERIA = [
    ("^relax", ""),
    ("^relax", "i"),
    ("^relax", "m"),
    ("^relax$", "im"),
    ("relax$", "m"),
    ("lax$", "ims"),
    ("^re.lax", "s"),
    ("^re.lax", "is"),
    ("^KPOINTS", "i"),
    ("static", "i"),
    ("[r-t]tatic", "i"),
    ("^[^a-z]", "i"),
    ("^[^a-z]", "im"),
    ("^ion", "i"),
    ("^I", "i"),
    ("(?i)relax", ""),
    ("(?s)re.lax", "m"),
]


@pytest.mark.parametrize(
    ("pattern", "options"),
    [pytest.param(p, o, id=f"{p}-{o}") for p, o in OPTION_CRITERIA],
)
def test_regex_options_search_as_mongodb_does(
    backend: EntryBackend, pattern: str, options: str
) -> None:
    """``$options`` as MongoDB reads them, whose matcher in mongomock (the ``memory`` and
    substitute ``mongo`` cases) searches ``re.compile(pattern, flags)``: the reference."""
    docs = [make_doc(digest_of(f"{i:02x}"), name=name) for i, name in enumerate(OPTION_NAMES)]
    write(backend, docs)
    flags = 0
    for option in options:
        flags |= {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}[option]
    expected = {doc["digest"] for doc in docs if re.search(pattern, doc["name"], flags)}
    criteria = {"name": {"$regex": pattern, "$options": options}}
    assert selected(backend, criteria) == expected
    assert backend.count(criteria) == len(expected)
    assert backend.totals(criteria).entries == len(expected)


@pytest.mark.parametrize(
    "condition",
    [
        pytest.param({"$options": "i"}, id="without-regex"),
        pytest.param({"$eq": "relax_si", "$options": "i"}, id="beside-eq"),
        pytest.param({"$regex": "^relax", "$options": "x"}, id="verbose"),
        pytest.param({"$regex": "^relax", "$options": "iq"}, id="unknown-flag"),
        pytest.param({"$regex": "^relax", "$options": 1}, id="not-a-str"),
    ],
)
def test_bad_regex_options_are_refused_by_sql_backends(
    backend: EntryBackend, backend_kind: str, known: dict, condition: dict[str, Any]
) -> None:
    if backend_kind not in ("sqlite", "pgbackend"):
        pytest.skip("the maggma backend passes criteria to the store as they are")
    criteria = {"name": condition}
    with pytest.raises(ValueError, match=r"\$options"):
        backend.count(criteria)
    with pytest.raises(ValueError, match=r"\$options"):
        list(backend.select(criteria))


def test_select_streams_whole_documents(backend: EntryBackend, known: dict) -> None:
    found = backend.select({"digest": {"$in": [A, C]}})
    assert isinstance(found, Iterator)
    docs = {doc["digest"]: doc for doc in found}
    assert {k: normal(v) for k, v in docs.items()} == {A: normal(known[A]), C: normal(known[C])}


def test_count_of_everything(backend: EntryBackend, known: dict) -> None:
    assert backend.count() == 5
    assert backend.count(None) == 5
    assert backend.count({}) == 5


@pytest.mark.parametrize(
    "fields",
    [["name"], ["created", "hits"], ["digest", "valid"], ["consumed"]],
    ids=lambda f: "+".join(f),
)
def test_select_fields_projection(backend: EntryBackend, known: dict, fields: list[str]) -> None:
    docs = list(backend.select(None, fields=fields))
    assert len(docs) == 5
    for doc in docs:
        keys = set(doc) - {"_id"}
        assert keys == {"digest", *fields}, sorted(doc)
        full = known[doc["digest"]]
        assert normal({k: doc[k] for k in keys}) == normal({k: full[k] for k in keys})


def test_select_fields_with_criteria_and_order(backend: EntryBackend, known: dict) -> None:
    docs = list(backend.select({"valid": True}, fields=["hits"], order={"hits": -1}))
    assert [(d["digest"], d["hits"]) for d in docs] == [(C, 5), (A, 3), (E, 2)]


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        pytest.param({"created": 1}, [A, B, C, D, E], id="created-asc"),
        pytest.param({"created": -1}, [E, D, C, B, A], id="created-desc"),
        pytest.param({"hits": -1}, [C, A, E, D, B], id="hits-desc"),
        pytest.param({"hits": 1}, [B, D, E, A, C], id="hits-asc"),
        pytest.param({"duration": -1}, [D, B, A, C, E], id="duration-desc"),
        pytest.param({"name": 1}, [E, D, B, A, C], id="name-asc"),
        # in order: invalid ones (False) first, each group newest first
        pytest.param({"valid": 1, "created": -1}, [D, B, E, C, A], id="valid-then-created"),
        pytest.param({"function": 1, "hits": 1}, [E, B, D, A, C], id="function-then-hits"),
    ],
)
def test_select_order(
    backend: EntryBackend, known: dict, order: dict[str, int], expected: list[str]
) -> None:
    assert digests(backend.select(order=order)) == expected
    assert digests(backend.select(None, ["hits"], order)) == expected


def test_select_order_by_last_hit(backend: EntryBackend, known: dict) -> None:
    served = {"last_hit": {"$ne": None}}
    assert digests(backend.select(served, order={"last_hit": 1})) == [A, D, E, C]
    assert digests(backend.select(served, order={"last_hit": -1}, limit=2)) == [C, E]


def test_select_order_puts_nulls_first_ascending(backend: EntryBackend, known: dict) -> None:
    # MongoDB's order: null sorts before any value (first ascending, last descending)
    assert digests(backend.select(order={"last_hit": 1})) == [B, A, D, E, C]
    assert digests(backend.select(order={"last_hit": -1})) == [C, E, D, A, B]
    assert digests(backend.select(order={"maker": 1, "created": 1})) == [A, B, D, E, C]
    assert digests(backend.select(order={"cache_version": -1, "created": -1}, limit=2)) == [C, E]


@pytest.mark.parametrize(
    ("criteria", "order", "limit", "expected"),
    [
        pytest.param(None, {"created": 1}, 2, [A, B], id="oldest-two"),
        pytest.param(None, {"created": -1}, 1, [E], id="newest"),
        pytest.param(None, {"hits": -1}, 3, [C, A, E], id="most-hit-three"),
        pytest.param({"valid": False}, {"created": -1}, 1, [D], id="criteria-and-limit"),
        pytest.param(None, {"created": 1}, 0, [A, B, C, D, E], id="zero-is-no-limit"),
        pytest.param(None, {"created": 1}, 50, [A, B, C, D, E], id="more-than-there-are"),
    ],
)
def test_select_limit(
    backend: EntryBackend,
    known: dict,
    criteria: Any,
    order: dict[str, int],
    limit: int,
    expected: list[str],
) -> None:
    assert digests(backend.select(criteria, order=order, limit=limit)) == expected


def test_select_limit_without_order(backend: EntryBackend, known: dict) -> None:
    found = digests(backend.select(limit=3))
    assert len(found) == 3
    assert len(set(found)) == 3
    assert set(found) <= set(known)


def test_select_on_an_empty_backend(backend: EntryBackend) -> None:
    assert list(backend.select()) == []
    assert list(backend.select({"valid": False}, ["name"], {"created": -1}, 5)) == []
    assert backend.count() == 0


OLD = "0" * 32
#: Optional fields an older entry document may lack (written before they existed).
LACKING = ("maker", "cache_version", "host", "invalid_reason", "last_hit", "files_size")


def test_a_document_lacking_optional_fields(backend: EntryBackend, known: dict) -> None:
    old = make_doc(OLD, name="old", created=T0 - DAY)
    for key in LACKING:
        del old[key]
    write(backend, [old])
    got = backend.read(OLD)
    assert got is not None
    assert normal(got) == normal(old)  # as stored: absent fields stay absent
    assert selected(backend, {"maker": None}) == {OLD, A, B, D, E}  # null or missing
    assert selected(backend, {"maker": {"$exists": False}}) == {OLD}
    assert selected(backend, {"last_hit": None}) == {OLD, B}
    cutoff = T0 + DAY + HOUR
    unused = Filters(unused_since=cutoff).criteria()
    assert selected(backend, unused) == {OLD, A, B}
    totals = backend.totals({"name": "old"})
    assert (totals.entries, totals.files_bytes, totals.hits) == (1, 0, 0)
    backend.add_hits({OLD: (2, T0 + 9 * DAY)})
    assert backend.set_invalid([(OLD, "old")]) == [OLD]
    got = backend.read(OLD)
    assert got is not None
    assert (got["hits"], ms(got["last_hit"])) == (2, ms(T0 + 9 * DAY))
    assert (got["valid"], got["invalid_reason"]) == (False, "old")
    assert selected(backend, unused) == {A, B}


# --------------------------------------------------------------------------- hits / validity


def test_add_hits_adds_and_sets_last_hit(backend: EntryBackend, known: dict) -> None:
    when_a = T0 + 9 * DAY + timedelta(milliseconds=250)
    when_b = T0 + 9 * DAY + 2 * HOUR
    backend.add_hits({A: (2, when_a), B: (1, when_b)})
    a, b = backend.read(A), backend.read(B)
    assert a is not None
    assert b is not None
    assert (a["hits"], ms(a["last_hit"])) == (5, ms(when_a))
    assert (b["hits"], ms(b["last_hit"])) == (1, ms(when_b))
    # everything else as written
    for got, doc in ((a, known[A]), (b, known[B])):
        rest = {k: v for k, v in got.items() if k not in ("hits", "last_hit")}
        same = {k: v for k, v in doc.items() if k not in ("hits", "last_hit")}
        assert normal(rest) == normal(same)
    # the others untouched
    c = backend.read(C)
    assert c is not None
    assert (c["hits"], ms(c["last_hit"])) == (5, ms(T0 + 5 * DAY))
    # and the selections see the new values
    assert selected(backend, {"hits": {"$gte": 5}}) == {A, C}
    assert selected(backend, {"last_hit": {"$gte": T0 + 9 * DAY}}) == {A, B}


def test_add_hits_again_accumulates(backend: EntryBackend, known: dict) -> None:
    for i in range(3):
        backend.add_hits({E: (1, T0 + (10 + i) * DAY)})
    e = backend.read(E)
    assert e is not None
    assert e["hits"] == 5
    assert ms(e["last_hit"]) == ms(T0 + 12 * DAY)


@pytest.mark.parametrize(
    "when",
    [
        pytest.param(datetime(2024, 5, 1, 8, 30, 0, 500000), id="naive-utc"),
        pytest.param(datetime(2024, 5, 1, 8, 30, 0, 500000, tzinfo=UTC), id="aware-utc"),
        pytest.param(
            datetime(2024, 5, 1, 10, 30, 0, 500000, tzinfo=timezone(timedelta(hours=2))),
            id="aware-other-zone",
        ),
    ],
)
def test_add_hits_times_are_instants(backend: EntryBackend, known: dict, when: datetime) -> None:
    backend.add_hits({B: (4, when)})
    b = backend.read(B)
    assert b is not None
    assert b["hits"] == 4
    assert ms(b["last_hit"]) == datetime(2024, 5, 1, 8, 30, 0, 500000)
    assert selected(backend, {"last_hit": {"$gte": datetime(2024, 5, 1, 8, 30, tzinfo=UTC)}}) == {B}


def test_add_hits_ignores_absent_digests(backend: EntryBackend, known: dict) -> None:
    backend.add_hits({ABSENT: (3, T0 + 9 * DAY), D: (1, T0 + 9 * DAY)})
    assert backend.read(ABSENT) is None
    assert backend.count() == 5
    d = backend.read(D)
    assert d is not None
    assert d["hits"] == 2
    backend.add_hits({})  # nothing to do


def test_add_hits_on_a_large_entry_keeps_its_output(backend: EntryBackend, known: dict) -> None:
    backend.add_hits({C: (1, T0 + 9 * DAY)})
    c = backend.read(C)
    assert c is not None
    assert c["hits"] == 6
    assert CacheEntry.from_document(c).output == large_output()


def test_set_invalid_marks_only_those_fields(backend: EntryBackend, known: dict) -> None:
    found = backend.set_invalid([(ABSENT, "gone"), (C, "upstream B invalid"), (A, "by hand")])
    assert found == [C, A]  # the ones that exist, in the order asked
    for digest, reason in ((A, "by hand"), (C, "upstream B invalid")):
        got = backend.read(digest)
        assert got is not None
        assert got["valid"] is False
        assert got["invalid_reason"] == reason
        rest = {k: v for k, v in got.items() if k not in ("valid", "invalid_reason")}
        same = {k: v for k, v in known[digest].items() if k not in ("valid", "invalid_reason")}
        assert normal(rest) == normal(same)
    assert backend.read(ABSENT) is None
    assert selected(backend, {"valid": False}) == {A, B, C, D}
    assert selected(backend, Filters(invalid=False).criteria()) == {E}
    e = backend.read(E)
    assert e is not None
    assert e["valid"] is True
    assert e["invalid_reason"] is None


def test_set_invalid_returns_the_order_asked(backend: EntryBackend, known: dict) -> None:
    assert backend.set_invalid([(E, "x"), (B, "y"), (A, "z")]) == [E, B, A]
    assert backend.set_invalid([]) == []
    assert backend.set_invalid([(ABSENT, "nothing")]) == []


def test_set_invalid_keeps_a_hit_count_written_meanwhile(
    backend: EntryBackend, known: dict
) -> None:
    backend.add_hits({A: (4, T0 + 8 * DAY)})
    assert backend.set_invalid([(A, "superseded")]) == [A]
    a = backend.read(A)
    assert a is not None
    assert (a["hits"], ms(a["last_hit"]), a["valid"]) == (7, ms(T0 + 8 * DAY), False)
    backend.add_hits({A: (1, T0 + 9 * DAY)})  # a hit counted after: kept invalid
    a = backend.read(A)
    assert a is not None
    assert (a["hits"], a["valid"], a["invalid_reason"]) == (8, False, "superseded")


def test_set_invalid_of_an_invalid_entry_replaces_the_reason(
    backend: EntryBackend, known: dict
) -> None:
    assert backend.set_invalid([(B, "new reason")]) == [B]
    b = backend.read(B)
    assert b is not None
    assert (b["valid"], b["invalid_reason"]) == (False, "new reason")


# --------------------------------------------------------------------------- totals


def test_totals_of_everything(backend: EntryBackend, known: dict) -> None:
    totals = backend.totals()
    assert isinstance(totals, Totals)
    assert totals.entries == 5
    assert totals.invalid == 2
    assert totals.hits == 3 + 0 + 5 + 1 + 2
    expected_saved = sum(d["hits"] * d["duration"] for d in known.values())
    assert expected_saved == pytest.approx(3 * 2.5 + 5 * 1.5 + 1 * 100.0 + 2 * 0.25)
    assert totals.time_saved == pytest.approx(expected_saved)
    assert totals.files_bytes == sum(d["files_size"] for d in known.values())
    assert totals.files_bytes == (1000 + 1001) + 1000
    assert totals.functions == {"tests.jobs:relax": 3, "tests.jobs:static": 1, "tests.jobs:band": 1}
    assert next(iter(totals.functions)) == "tests.jobs:relax"  # most first
    assert totals.oldest is not None
    assert totals.newest is not None
    assert totals.oldest.tzinfo is not None
    assert totals.newest.tzinfo is not None
    assert totals.oldest.utcoffset() == timedelta(0)
    assert ms(totals.oldest) == ms(T0)
    assert ms(totals.newest) == ms(T0 + 4 * DAY)
    assert totals == backend.totals(None) == backend.totals({})


def test_totals_with_criteria(backend: EntryBackend, known: dict) -> None:
    totals = backend.totals(Filters(invalid=True).criteria())
    assert (totals.entries, totals.invalid, totals.hits) == (2, 2, 1)
    assert totals.time_saved == pytest.approx(100.0)
    assert totals.files_bytes == 1000
    assert totals.functions == {"tests.jobs:relax": 2}
    assert totals.oldest is not None
    assert totals.newest is not None
    assert (ms(totals.oldest), ms(totals.newest)) == (ms(T0 + DAY), ms(T0 + 3 * DAY))

    totals = backend.totals(Filters(since=T0 + 2 * DAY).criteria())
    assert (totals.entries, totals.invalid, totals.hits) == (3, 1, 8)
    assert totals.time_saved == pytest.approx(5 * 1.5 + 100.0 + 2 * 0.25)
    functions = totals.functions
    assert functions == {"tests.jobs:static": 1, "tests.jobs:relax": 1, "tests.jobs:band": 1}


def test_totals_functions_most_first(backend: EntryBackend) -> None:
    docs = [make_doc(f"{i:02x}" + "7" * 30, function="m:few", created=T0) for i in range(2)]
    docs += [make_doc(f"{i:02x}" + "8" * 30, function="m:many", created=T0) for i in range(5)]
    docs += [make_doc("99" + "9" * 30, function="m:one", created=T0)]
    write(backend, docs)
    functions = backend.totals().functions
    assert functions == {"m:many": 5, "m:few": 2, "m:one": 1}
    assert list(functions) == ["m:many", "m:few", "m:one"]


def test_totals_of_nothing(backend: EntryBackend, known: dict) -> None:
    totals = backend.totals({"name": "nothing"})
    assert (totals.entries, totals.invalid, totals.hits, totals.files_bytes) == (0, 0, 0, 0)
    assert totals.time_saved == 0
    assert totals.functions == {}
    assert totals.oldest is None
    assert totals.newest is None


def test_totals_follow_hits_and_invalidations(backend: EntryBackend, known: dict) -> None:
    backend.add_hits({B: (10, T0 + 9 * DAY)})
    backend.set_invalid([(E, "x")])
    totals = backend.totals()
    assert (totals.entries, totals.invalid, totals.hits) == (5, 3, 21)
    assert totals.time_saved == pytest.approx(3 * 2.5 + 10 * 10.0 + 5 * 1.5 + 100.0 + 2 * 0.25)


# --------------------------------------------------------------------------- consumers, remove


def test_consumers(backend: EntryBackend, known: dict) -> None:
    found = list(backend.consumers())
    assert all(isinstance(d, str) and isinstance(c, list) for d, c in found), found
    assert {d: sorted(c) for d, c in found} == {B: [A], C: sorted([A, B])}
    assert len(found) == 2  # each consumer once, none without a consumed list


def test_consumers_of_an_empty_backend(backend: EntryBackend) -> None:
    assert list(backend.consumers()) == []
    write(backend, [make_doc(A)])
    assert list(backend.consumers()) == []


def test_remove(backend: EntryBackend, known: dict) -> None:
    backend.remove([A, ABSENT, C])
    assert backend.read(A) is None
    assert backend.read(C) is None
    assert backend.count() == 3
    assert selected(backend, None) == {B, D, E}
    assert normal(backend.read(B)) == normal(known[B])
    backend.remove([])
    backend.remove([A])  # already gone
    assert backend.count() == 3
    assert {d for d, _ in backend.consumers()} == {B}


def test_remove_then_write_again(backend: EntryBackend, known: dict) -> None:
    backend.remove([D])
    write(backend, [known[D]])
    assert normal(backend.read(D)) == normal(known[D])
    assert backend.count() == 5


# --------------------------------------------------------------------------- coordinator


@pytest.fixture
def coordinator(backend: EntryBackend) -> Coordinator:
    made = backend.coordinator()
    # every backend here keeps claims and aliases beside its entries
    assert made is not None
    assert isinstance(made, Coordinator)
    return made


def test_claim_first_owner_wins(coordinator: Coordinator) -> None:
    assert coordinator.claim(A, "worker-1", 60) == "worker-1"
    assert coordinator.claim(A, "worker-2", 60) == "worker-1"
    assert coordinator.claim(A, "worker-1", 60) == "worker-1"  # renewal
    assert coordinator.claim(B, "worker-2", 60) == "worker-2"  # another claim
    assert coordinator.claim(A, "worker-2", 60) == "worker-1"


def test_release_lets_another_owner_claim(coordinator: Coordinator) -> None:
    assert coordinator.claim(A, "worker-1", 60) == "worker-1"
    coordinator.release(A, "worker-2")  # not theirs: nothing happens
    assert coordinator.claim(A, "worker-2", 60) == "worker-1"
    coordinator.release(A, "worker-1")
    assert coordinator.claim(A, "worker-2", 60) == "worker-2"
    coordinator.release(ABSENT, "worker-1")  # nobody holds it: harmless


def test_claim_expires_after_its_lease(coordinator: Coordinator) -> None:
    assert coordinator.claim(A, "worker-1", 0.3) == "worker-1"
    assert coordinator.claim(A, "worker-2", 60) == "worker-1"
    time.sleep(0.6)
    assert coordinator.claim(A, "worker-2", 60) == "worker-2"
    assert coordinator.claim(A, "worker-1", 60) == "worker-2"


def test_renewal_extends_the_lease(coordinator: Coordinator) -> None:
    assert coordinator.claim(A, "worker-1", 0.3) == "worker-1"
    assert coordinator.claim(A, "worker-1", 60) == "worker-1"  # renewed for a minute
    time.sleep(0.6)
    assert coordinator.claim(A, "worker-2", 60) == "worker-1"


def test_aliases_last_writer_wins(coordinator: Coordinator) -> None:
    assert coordinator.get_aliases([]) == {}
    assert coordinator.get_aliases(["/runs/a"]) == {}
    coordinator.set_aliases({"/runs/a": A, "/runs/b": B})
    coordinator.set_aliases({"/runs/a": C})
    coordinator.set_aliases({})
    assert coordinator.get_aliases(["/runs/a", "/runs/b", "/runs/none"]) == {
        "/runs/a": C,
        "/runs/b": B,
    }
    assert coordinator.get_aliases(["/runs/b"]) == {"/runs/b": B}


def test_claims_and_aliases_are_not_entries(
    backend: EntryBackend, coordinator: Coordinator
) -> None:
    coordinator.claim(A, "worker-1", 60)
    coordinator.set_aliases({"/runs/a": A})
    assert backend.count() == 0
    assert list(backend.select()) == []
    assert backend.read(A) is None


# --------------------------------------------------------------------------- two connections


def test_a_second_connection_sees_every_change(
    backend: EntryBackend, reopen: Callable[[], EntryBackend]
) -> None:
    """What another worker of the same cache sees: every write is committed when it returns."""
    docs = known_set()
    write(backend, docs)
    backend.add_hits({A: (2, T0 + 9 * DAY)})
    assert backend.set_invalid([(E, "by hand")]) == [E]
    claims = backend.coordinator()
    assert claims is not None
    assert claims.claim(C, "worker-1", 60) == "worker-1"
    claims.set_aliases({"/runs/c": C})

    other = reopen()
    assert other.count() == 5
    a = other.read(A)
    assert a is not None
    assert (a["hits"], ms(a["last_hit"])) == (5, ms(T0 + 9 * DAY))
    assert selected(other, Filters(invalid=True).criteria()) == {B, D, E}
    assert normal(other.read(C)) == normal(docs[C])
    their_claims = other.coordinator()
    assert their_claims is not None
    assert their_claims.claim(C, "worker-2", 60) == "worker-1"
    assert their_claims.get_aliases(["/runs/c"]) == {"/runs/c": C}

    # and back
    other.remove([D])
    write(other, [make_doc(ABSENT, name="from_the_other")])
    their_claims.set_aliases({"/runs/c": ABSENT})
    claims.release(C, "worker-1")
    assert their_claims.claim(C, "worker-2", 60) == "worker-2"
    assert backend.read(D) is None
    assert backend.read(ABSENT) is not None
    assert backend.count() == 5
    assert claims.get_aliases(["/runs/c"]) == {"/runs/c": ABSENT}


def test_entries_outlive_the_connection(
    backend: EntryBackend, reopen_after_close: Callable[[], EntryBackend]
) -> None:
    docs = known_set()
    write(backend, docs)
    backend.close()
    other = reopen_after_close()
    assert {d: normal(other.read(d)) for d in docs} == {d: normal(v) for d, v in docs.items()}
    assert other.totals().entries == 5


# --------------------------------------------------------------------------- threads


def test_a_thread_safe_backend_takes_writes_from_another_thread(backend: EntryBackend) -> None:
    """What ``thread_safe`` promises (the write-behind writer thread while the job reads)."""
    if not backend.thread_safe:
        pytest.skip(f"{backend.name} declares thread_safe False")
    docs = [make_doc(f"{i:04x}" + "6" * 28, created=T0 + i * HOUR) for i in range(40)]
    write(backend, docs[:1])
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for doc in docs[1:]:
                write(backend, [doc])
                backend.add_hits({docs[0]["digest"]: (1, T0 + DAY)})
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    while thread.is_alive() or reads == 0:
        assert backend.read(docs[0]["digest"], explain=False) is not None
        assert backend.count() >= 1
        reads += 1
    thread.join()
    assert errors == []
    assert backend.count() == len(docs)
    first = backend.read(docs[0]["digest"])
    assert first is not None
    assert first["hits"] == len(docs) - 1
