"""Attacks on a shared store, as an attacker with write access to its table would make them.

Each attack is written with the database's own client (sqlite3, psycopg) into the row of a
real entry, recorded by a real flow; the victim then runs the same flow in a fresh Python
process. Every attack must meet an invalid entry: one clear warning, the job runs and computes
the right output, and nothing the attacker named is imported, read or run.
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path
from typing import Any

import pytest
from jobflow.settings import JobflowSettings
from pydantic import BaseModel

from jobflow_cache.backends.sqlite import SQLiteBackend
from jobflow_cache.backends.sqlite import _prepare as sqlite_rows
from jobflow_cache.entry import CHECKSUM_FIELDS, document_checksum
from tests.conftest import run_python
from tests.support import jobs

PAYLOAD_MODULE = "jfc_attack_payload"

VICTIM = """
import json, resource, sys, warnings
from jobflow import Flow
from jobflow_cache import run_locally
from tests.support import jobs
parsed = []
if {spy}:  # every text the victim parses, to show a tampered output never is
    import jobflow_cache.codec as codec
    from jobflow_cache.execution import recording, serving
    real = json.loads
    def spy(text, *args, **kwargs):
        if isinstance(text, (str, bytes)) and "ATTACK-SENTINEL" in str(text):
            parsed.append(str(text)[:80])
        return real(text, *args, **kwargs)
    json.loads = codec.json.loads = spy
    real_codec = codec.loads
    def spy_codec(text, *args, **kwargs):
        if "ATTACK-SENTINEL" in text:
            parsed.append(text[:80])
        return real_codec(text, *args, **kwargs)
    recording.loads = serving.loads = spy_codec
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    made = [jobs.add(a, b) for a, b in {pairs}]
    responses = run_locally(Flow(made), log=False, ensure_success=True)
outputs = [responses[job.uuid][1].output for job in made]
print("RESULT:" + json.dumps({{
    "output": outputs[0],
    "outputs": outputs,
    "warnings": [str(w.message) for w in caught if "jobflow-cache" in str(w.message)],
    "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "payload_imported": "{payload}" in sys.modules,
    "parsed": parsed,
}}))
"""


class Wrapper(BaseModel):
    """A pydantic model whose field pydantic builds from a plain dict (no ``@class``)."""

    settings: Any = None
    nested: list[Any] = []


class SettingsHolder(BaseModel):
    """A model with a field typed as a class that reads files when built."""

    settings: JobflowSettings | None = None


class Shared:
    """A shared store the victim uses, and the attacker's raw access to its table."""

    def __init__(self, kind: str, env: dict[str, str], read: Any, write: Any) -> None:
        self.kind = kind
        self.env = env
        self.read_raw = read
        self.write_raw = write

    def victim(
        self,
        a: int = 1,
        b: int = 2,
        env: dict[str, str] | None = None,
        spy: bool = False,
        pairs: list[tuple[int, int]] | None = None,
    ) -> dict[str, Any]:
        pairs = pairs or [(a, b)]
        code = VICTIM.format(pairs=pairs, payload=PAYLOAD_MODULE, spy=spy)
        out = run_python(code, env={**self.env, **(env or {})}, cwd=Path.cwd())
        line = next(x for x in out.splitlines() if x.startswith("RESULT:"))
        return json.loads(line[len("RESULT:") :])

    def only_digest(self) -> str:
        docs = self.read_raw()
        assert len(docs) == 1, docs
        return next(iter(docs))

    def doc(self, digest: str) -> dict[str, Any]:
        return self.read_raw()[digest]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared(request: pytest.FixtureRequest, isolated_cache: Path) -> Shared:
    if request.param == "sqlite":
        path = isolated_cache / "cache.sqlite"

        def read() -> dict[str, dict[str, Any]]:
            backend = SQLiteBackend(path)
            try:
                return {doc["digest"]: doc for doc in backend.select()}
            finally:
                backend.close()

        def write(key: str, doc: dict[str, Any]) -> None:
            backend = SQLiteBackend(path)  # the row of ``key`` holds ``doc``, whatever it says
            try:
                with backend._transaction() as conn:
                    SQLiteBackend._insert(conn, [sqlite_rows(doc, key)])
            finally:
                backend.close()

        return Shared("sqlite", {}, read, write)
    from jobflow_cache.backends.postgres import PostgresBackend
    from jobflow_cache.backends.postgres import _prepare as pg_rows

    uri = request.getfixturevalue("postgres_uri")
    table = request.getfixturevalue("pg_table")
    spec = {"type": "PostgresBackend", "uri": uri, "table": table}

    def pg_read() -> dict[str, dict[str, Any]]:
        backend = PostgresBackend(uri, table=table)
        try:
            return {doc["digest"]: doc for doc in backend.select()}
        finally:
            backend.close()

    def pg_write(key: str, doc: dict[str, Any]) -> None:
        backend = PostgresBackend(uri, table=table)  # the row of ``key`` holds ``doc``
        try:
            rows = [pg_rows(doc, key)]
            backend._run(lambda conn: backend._in_transaction(conn, rows))
        finally:
            backend.close()

    return Shared("postgres", {"JOBFLOW_CACHE_STORE": json.dumps(spec)}, pg_read, pg_write)


def reseal(doc: dict[str, Any]) -> dict[str, Any]:
    """What an attacker does after changing a served field: the checksum is public (xxh3 of
    the sealed fields), so it is recomputed, as anyone can."""
    doc["checksum"] = document_checksum(doc)
    assert doc["checksum"]
    return doc


def seed(shared: Shared, counts: Any, **kwargs: Any) -> str:
    first = shared.victim(**kwargs)
    assert first["output"] == 3
    assert first["warnings"] == []
    assert counts()["add"] == 1
    return shared.only_digest()


def assert_refused(shared: Shared, counts: Any, reason: str, **kwargs: Any) -> dict[str, Any]:
    """The victim's run after an attack: the job ran again, right output, one warning."""
    before = counts()["add"]
    result = shared.victim(**kwargs)
    assert result["output"] == 3
    assert counts()["add"] == before + 1, "the tampered entry was served"
    assert len(result["warnings"]) == 1, result["warnings"]
    message = result["warnings"][0]
    assert "is not used" in message or "cannot be served" in message, message
    assert reason in result["warnings"][0], result["warnings"][0]
    assert not result["payload_imported"]
    return result


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    """What the attacker placed where the victim may read it: a YAML naming a module that
    is importable from the victim's working folder, which writes a marker when imported."""
    marker = tmp_path / "PWNED"
    cwd = Path.cwd()
    (cwd / f"{PAYLOAD_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').write('code ran')\nclass Evil:\n    pass\n"
    )
    (cwd / "payload.yaml").write_text(
        f"JOB_STORE:\n  '@module': {PAYLOAD_MODULE}\n  '@class': Evil\n"
    )
    return marker


SETTINGS_NODE = {
    "@module": "jobflow.settings",
    "@class": "JobflowSettings",
    "CONFIG_FILE": "payload.yaml",
}

ATTACKS = {
    # the issue's attack, nested in a list in a dict
    "config_file_nested": {"a": [1, {"b": SETTINGS_NODE}]},
    # inside a pydantic model's Any field (validated with monty's decoder first)
    "in_pydantic_field": {
        "@module": "tests.test_trust",
        "@class": "Wrapper",
        "nested": [{"x": SETTINGS_NODE}],
    },
    # a plain dict pydantic itself builds into JobflowSettings (no @class at all)
    "typed_pydantic_field": {
        "@module": "tests.test_trust",
        "@class": "SettingsHolder",
        "settings": {"CONFIG_FILE": "payload.yaml"},
    },
    # a module that is no installed package, deep inside
    "uninstalled_module": {"x": {"y": [[{"@module": PAYLOAD_MODULE, "@class": "Evil"}]]}},
    # a method bound to a settings object
    "bound": [
        {"@module": "jobflow.settings", "@callable": "X.model_dump", "@bound": SETTINGS_NODE}
    ],
    # a pandas frame whose JSON text (decoded by monty with a decoder of its own) hides one
    "pandas_text": {
        "@module": "pandas",
        "@class": "DataFrame",
        "data": json.dumps({"c": {"0": {"@module": PAYLOAD_MODULE, "@class": "Evil"}}}),
    },
    # a class whose constructor reads the file it is given
    "vasprun_reads_file": {
        "@module": "pymatgen.io.vasp.outputs",
        "@class": "Vasprun",
        "filename": "payload.yaml",
    },
    # a function that is no job
    "callable": {"f": {"@module": "os", "@callable": "system", "@bound": None}},
}


def test_nested_documents_never_decode(shared: Shared, counts, payload: Path) -> None:
    """Every attack of :data:`ATTACKS` on the entry of a job of its own, in one flow."""
    names = sorted(ATTACKS)
    pairs = [(i, 100) for i in range(len(names))]
    first = shared.victim(pairs=pairs)
    assert first["outputs"] == [a + b for a, b in pairs]
    assert counts()["add"] == len(names)
    by_output = {int(doc["output"]): (key, doc) for key, doc in shared.read_raw().items()}
    for (a, b), name in zip(pairs, names):
        key, doc = by_output[a + b]
        doc["output"] = json.dumps(ATTACKS[name])
        shared.write_raw(key, reseal(doc))
    result = shared.victim(pairs=pairs)
    assert result["outputs"] == [a + b for a, b in pairs]
    assert counts()["add"] == 2 * len(names), "a tampered entry was served"
    assert len(result["warnings"]) == len(names), result["warnings"]
    for message in result["warnings"]:
        assert "cannot be served (a cached value" in message, message
    assert not result["payload_imported"]
    assert not payload.exists(), "the attacker's code ran"
    # the jobs' sound entries replaced the attacker's: served next time
    again = shared.victim(pairs=pairs)
    assert again["outputs"] == result["outputs"]
    assert again["warnings"] == []
    assert counts()["add"] == 2 * len(names)


def test_config_file_payload_runs_when_not_checked(shared: Shared, counts, payload: Path) -> None:
    """The payload is real: decoded by monty's decoder unchecked, the node runs the code."""
    run_python(
        "from monty.json import MontyDecoder\n"
        "try:\n"
        f"    MontyDecoder().process_decoded({SETTINGS_NODE!r})\n"
        "except Exception:\n"
        "    pass  # the validation fails, after the payload ran\n",
        cwd=Path.cwd(),
    )
    assert payload.exists()


def _bomb(size: int) -> str:
    """zlib of ``size`` bytes of one repeated JSON character, built a chunk at a time."""
    deflater = zlib.compressobj(9)
    chunk = b"[" + b"0" * ((1 << 20) - 1)
    parts = [deflater.compress(chunk)]
    parts.extend(deflater.compress(b"0" * (1 << 20)) for _ in range(size >> 20))
    parts.append(deflater.flush())
    return "zlib:" + base64.b64encode(b"".join(parts)).decode()


@pytest.mark.slow
def test_zlib_bomb_is_refused_in_bounded_memory(shared: Shared, counts) -> None:
    digest = seed(shared, counts)
    baseline = shared.victim()["maxrss_kb"]  # a hit: the victim's ordinary footprint
    doc = shared.doc(digest)
    bomb = _bomb(1500 << 20)  # ~1.46 MB stored, 1.5 GB inflated
    assert len(bomb) < 2 << 20
    doc["output"] = ""
    doc["packed"] = {"output": bomb}
    shared.write_raw(digest, doc)
    result = assert_refused(shared, counts, "too large")
    grown_mb = (result["maxrss_kb"] - baseline) / 1024
    assert grown_mb < 100, f"the victim grew by {grown_mb:.0f} MB"


def test_oversized_plain_output_is_refused(shared: Shared, counts) -> None:
    digest = seed(shared, counts)
    doc = shared.doc(digest)
    doc["output"] = json.dumps(["x" * 5000])
    shared.write_raw(digest, reseal(doc))
    assert_refused(shared, counts, "too large", env={"JOBFLOW_CACHE_MAX_DECODED_SIZE": "4096"})


def test_bad_checksum_is_never_parsed(shared: Shared, counts) -> None:
    digest = seed(shared, counts)
    doc = shared.doc(digest)
    doc["output"] = json.dumps({"ATTACK-SENTINEL": [1, 2]})  # checksum left as it was
    shared.write_raw(digest, doc)
    result = assert_refused(shared, counts, "checksum mismatch", spy=True)
    assert result["parsed"] == []


def test_entry_moved_to_another_digest_is_refused(shared: Shared, counts) -> None:
    digest = seed(shared, counts)
    other = seed_other(shared, counts)
    shared.write_raw(other, shared.doc(digest))  # add(1, 2)'s entry under add(2, 2)
    before = counts()["add"]
    result = shared.victim(a=2, b=2)
    assert result["output"] == 4
    assert counts()["add"] == before + 1
    assert len(result["warnings"]) == 1
    assert "another digest" in result["warnings"][0]


def seed_other(shared: Shared, counts: Any) -> str:
    known = set(shared.read_raw())
    result = shared.victim(a=2, b=2)
    assert result["output"] == 4
    (new,) = set(shared.read_raw()) - known
    return new


# -- signed entries ------------------------------------------------------------------------
KEY = "k" * 32
GROUP = {"JOBFLOW_CACHE_GROUP_KEY": KEY}


def test_signed_entry_is_served_and_unsigned_refused(shared: Shared, counts) -> None:
    digest = seed(shared, counts, env=GROUP)
    assert shared.doc(digest)["signature"].startswith("hmac-sha256:")
    hit = shared.victim(env=GROUP)
    assert hit["output"] == 3
    assert hit["warnings"] == []
    assert counts()["add"] == 1
    # keyless readers ignore signatures: the signed entry serves them too
    assert shared.victim()["output"] == 3
    assert counts()["add"] == 1
    # the attacker, with the table but not the key, writes an entry of their own
    doc = shared.doc(digest)
    doc["output"] = "1000"
    doc["signature"] = ""
    shared.write_raw(digest, reseal(doc))
    assert_refused(shared, counts, "not signed", env=GROUP)
    # the job's signed entry replaced it
    assert shared.victim(env=GROUP)["warnings"] == []
    assert counts()["add"] == 2


def test_altered_signed_entry_is_refused(shared: Shared, counts) -> None:
    digest = seed(shared, counts, env=GROUP)
    doc = shared.doc(digest)
    doc["output"] = "1000"  # signature kept, checksum recomputed
    shared.write_raw(digest, reseal(doc))
    assert_refused(shared, counts, "signature does not match", env=GROUP)


def test_entry_signed_with_another_key_is_refused(shared: Shared, counts) -> None:
    seed(shared, counts, env={"JOBFLOW_CACHE_GROUP_KEY": "another key of 32 bytes........"})
    assert_refused(shared, counts, "another group key", env=GROUP)


def test_signed_entry_moved_to_another_digest_is_refused(shared: Shared, counts) -> None:
    digest = seed(shared, counts, env=GROUP)
    other = seed_other_signed(shared, counts)
    moved = shared.doc(digest)
    moved["digest"] = other  # relabelled, checksum recomputed: the signature still says D1
    shared.write_raw(other, reseal(moved))
    before = counts()["add"]
    result = shared.victim(a=2, b=2, env=GROUP)
    assert result["output"] == 4
    assert counts()["add"] == before + 1
    assert len(result["warnings"]) == 1
    assert "signature does not match" in result["warnings"][0]


def seed_other_signed(shared: Shared, counts: Any) -> str:
    known = set(shared.read_raw())
    assert shared.victim(a=2, b=2, env=GROUP)["output"] == 4
    (new,) = set(shared.read_raw()) - known
    return new


def test_unreadable_key_file_runs_the_flow_uncached(shared: Shared, counts, tmp_path) -> None:
    seed(shared, counts)
    missing = {"JOBFLOW_CACHE_GROUP_KEY_FILE": str(tmp_path / "no-such-key")}
    result = shared.victim(env=missing)
    assert result["output"] == 3
    assert counts()["add"] == 2
    assert len(result["warnings"]) == 1
    assert "group key" in result["warnings"][0]


def test_checksum_fields_are_what_is_signed() -> None:
    """The signature covers the checksum, which covers every served field."""
    assert {"output", "response", "files", "digest"} <= CHECKSUM_FIELDS


# -- the rule, in one process --------------------------------------------------------------
def test_classes_that_reach_outside_are_refused_and_real_outputs_pass() -> None:
    from emmet.core.tasks import TaskDoc
    from jobflow import Flow, Job, JobStore, Response
    from pymatgen.core import Structure
    from pymatgen.io.vasp.outputs import Outcar, Vasprun

    from jobflow_cache.marking import CachedFunction
    from jobflow_cache.trust import class_problem

    for refused in (JobflowSettings, JobStore, Vasprun, Outcar, SettingsHolder):
        assert class_problem(refused), refused
    for data in (Structure, TaskDoc, Job, Flow, Response, CachedFunction, Wrapper):
        assert class_problem(data) is None, (data, class_problem(data))


def test_real_dynamic_responses_pass_the_check() -> None:
    from jobflow import Flow

    from jobflow_cache.codec import check_trusted, dumps, loads
    from jobflow_cache.marking import cache_flow
    from tests.support import jobs

    plain = Flow([jobs.add(1, 2), jobs.mul(2, 3)])
    marked = cache_flow(Flow([jobs.add(1, 2)]))
    for flow in (plain, marked):
        text = dumps({"replace": flow})  # as a dynamic job's response is recorded
        assert '"@callable"' in text
        check_trusted(json.loads(text))
        assert loads(text)["replace"].jobs[0].function is not None


@pytest.mark.parametrize(
    "node",
    [
        {"@module": "torch", "@class": "Tensor", "dtype": "os.system", "data": []},
        {"@module": "pandas", "@class": "Series", "data": {"not": "text"}},
        {"@module": "builtins", "@class": "eval", "source": "1"},  # no class
        {"@module": "jobflow_cache.store", "@class": "CacheStore"},
        {"@module": "maggma.stores", "@class": "MongoStore", "database": "x"},
        {"@module": "tests.support.jobs", "@callable": "executed"},  # a function, not a job
    ],
)
def test_handlers_and_denied_classes(node: dict[str, Any]) -> None:
    from jobflow_cache.errors import UntrustedValueError
    from jobflow_cache.trust import check_trusted

    with pytest.raises(UntrustedValueError):
        check_trusted({"x": [node]})


def test_allowed_values_still_decode() -> None:
    from jobflow_cache.codec import dumps, loads

    value = {
        "when": __import__("datetime").datetime(2024, 1, 2),
        "path": Path("/a/b"),
        "job": jobs.add,
    }
    back = loads(dumps(value))
    assert back["when"] == value["when"]
    assert back["path"] == Path("/a/b")
    assert callable(back["job"].original)


def test_bomb_inflation_is_bounded_in_memory() -> None:
    import time
    import tracemalloc

    from jobflow_cache.entry import unpack_document
    from jobflow_cache.errors import TooLargeError

    bomb = _bomb(300 << 20)
    doc = {"output": "", "packed": {"output": bomb}}
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(TooLargeError):
        unpack_document(doc, limit=256 << 20)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak >> 20} MiB while refusing a bomb ({elapsed:.2f} s)"
    # under the limit it inflates, exactly
    small = {"output": "", "packed": {"output": _bomb(2 << 20)}}
    assert len(unpack_document(small, limit=8 << 20)["output"]) == (3 << 20)


def test_an_oversized_plain_field_names_the_limit_it_passed(monkeypatch) -> None:
    """The refusal names the limit, also when it is the setting's (it printed None)."""
    from jobflow_cache.entry import unpack_document
    from jobflow_cache.errors import TooLargeError

    monkeypatch.setenv("JOBFLOW_CACHE_MAX_DECODED_SIZE", "1000")  # settings follow the env
    with pytest.raises(TooLargeError, match="larger than 1000 bytes"):
        unpack_document({"output": "x" * 1001})
    with pytest.raises(TooLargeError, match="larger than 10 bytes"):
        unpack_document({"output": "x" * 11}, limit=10)


def test_signatures_name_their_key() -> None:
    from jobflow_cache.trust import key_id, sign, signature_problem

    key, other = b"k" * 32, b"o" * 32
    signed = sign(key, "d" * 32, "c" * 32)
    assert signature_problem(key, "d" * 32, "c" * 32, signed) is None
    assert "another group key" in str(signature_problem(other, "d" * 32, "c" * 32, signed))
    assert "does not match" in str(signature_problem(key, "d" * 32, "x" * 32, signed))
    assert "not signed" in str(signature_problem(key, "d" * 32, "c" * 32, ""))
    assert key_id(key) != key_id(other)
