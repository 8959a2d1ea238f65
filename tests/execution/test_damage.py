"""Damage is an invalid entry, never an outage.

A stored row that cannot be read (bytes that are not UTF-8, JSON cut short, a JSON number,
string, array or null where an entry belongs, an entry missing its fields), a store file
deleted or replaced while a run uses it, and a full cache folder: the workflow gives the
outputs plain jobflow gives, the damaged entry is INVALID for its digest only (its job runs and
a sound entry replaces it), ``cachetool verify`` reports it and ``verify --fix`` removes it, and
the listing commands say the row is unreadable instead of crashing.

Faults are real: rows are damaged with sqlite3 and psycopg as bit rot or an attacker with
write access to the table would damage them, runs after the damage happen in fresh processes,
the disk really fills up (a tmpfs mount, else an ext4 image on a loop device).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from jobflow import Flow, JobStore
from jobflow import run_locally as jobflow_run_locally
from maggma.stores import MemoryStore

from jobflow_cache import CacheStore, CacheWarning, Outcome, run_locally
from jobflow_cache.admin.verify import verify
from jobflow_cache.backends.base import SELECTABLE, UNREADABLE
from jobflow_cache.cli import cli
from tests.conftest import ROOT
from tests.support import jobs

#: A victim's run in a fresh process: the flow add(1, 2), add(5, 5), mul(2, 3) under
#: jobflow_cache.run_locally with the cache the environment configures; prints its outputs and
#: CacheWarnings as JSON.
VICTIM = """
import json, warnings
from jobflow import Flow, JobStore
from maggma.stores import MemoryStore
from jobflow_cache import CacheWarning, run_locally
from tests.support import jobs
flow = Flow([jobs.add(1, 2), jobs.add(5, 5), jobs.mul(2, 3)])
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    out = run_locally(flow, store=JobStore(MemoryStore()), log=False, ensure_success=True)
print(json.dumps({
    "outputs": [out[j.uuid][1].output for j in flow],
    "warnings": [str(w.message) for w in seen if issubclass(w.category, CacheWarning)],
}))
"""


def victim_flow() -> Flow:
    return Flow([jobs.add(1, 2), jobs.add(5, 5), jobs.mul(2, 3)])


def run_here() -> dict:
    """The victim's run in this process (to set up and to check the store afterwards)."""
    flow = victim_flow()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = run_locally(flow, store=JobStore(MemoryStore()), log=False, ensure_success=True)
    return {
        "outputs": [out[j.uuid][1].output for j in flow],
        "warnings": [str(w.message) for w in seen if issubclass(w.category, CacheWarning)],
    }


def plain_outputs() -> list:
    """The outputs of the victim's flow under plain jobflow (no cache anywhere)."""
    flow = Flow([jobs.add(1, 2), jobs.add(5, 5), jobs.mul(2, 3)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jobflow's own cd() deprecation
        out = jobflow_run_locally(flow, store=JobStore(MemoryStore()), log=False)
    return [out[j.uuid][1].output for j in flow]


def run_victim(cwd: Path) -> dict:
    cwd.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", VICTIM],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cachetool(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def add_digest() -> str:
    """Digest of the entry of add(1, 2)."""
    with CacheStore.from_settings() as cache:
        (digest,) = [d["digest"] for d in cache.find({"name": "add"}) if "3" in d["output"]]
    return digest


# ----------------------------------------------------------------------------- SQLite rows


def _sqlite_file() -> Path:
    return Path(os.environ["JOBFLOW_CACHE_DIR"]) / "cache.sqlite"


#: The columns of jfc_entries besides digest and name (the SELECTABLE fields, one column each).
_OTHER_COLUMNS = [f for f in SELECTABLE if f not in ("digest", "name")]


def _damage_sqlite(digest: str, how: str) -> None:
    """Damage the rows of ``digest`` as bit rot or a hand with sqlite3 would.

    An entry is a ``jfc_entries`` row (a column per selectable field and ``doc``, the JSON text
    of its other small fields) and a ``jfc_payloads`` row (``served``, the JSON text of its
    output, response and files; ``explain``)."""
    conn = sqlite3.connect(_sqlite_file())
    conn.text_factory = bytes  # the stored bytes as they are, written back as text
    (doc,) = conn.execute("SELECT doc FROM jfc_entries WHERE digest = ?", (digest,)).fetchone()
    (served,) = conn.execute(
        "SELECT served FROM jfc_payloads WHERE digest = ?", (digest,)
    ).fetchone()
    table, column, damaged = "jfc_entries", "doc", None
    if how == "invalid UTF-8":  # one byte of the stored doc text is no longer UTF-8
        damaged = doc.replace(b'"dynamic"', b'"dyn\xffmic"', 1)
        assert damaged != doc
    elif how == "invalid UTF-8 in the payload":  # the same in the large fields' text
        table, column = "jfc_payloads", "served"
        damaged = served.replace(b'"output"', b'"out\xffut"', 1)
        assert damaged != served
    elif how == "invalid UTF-8 in a column":  # the same in a field's column of its own
        column = "name"
        damaged = b"a\xffd"
    elif how == "cut short":  # no index reads doc: bit rot (or a torn copy) cuts it anywhere
        damaged = doc[: len(doc) // 2]
    elif how == "a number":
        damaged = b"5"
    elif how == "fields missing":
        # the entry reduced to its digest and name, as a hand deleting fields would leave it:
        # doc an empty object, every other column NULL, no payload row; it reads back as
        # {"digest": ..., "name": "add"}, which decodes but is no cache entry
        with conn:
            nulls = ", ".join(f"{f} = NULL" for f in _OTHER_COLUMNS)
            sql = f"UPDATE jfc_entries SET {nulls}, doc = '{{}}' WHERE digest = ?"
            assert conn.execute(sql, (digest,)).rowcount == 1
            conn.execute("DELETE FROM jfc_payloads WHERE digest = ?", (digest,))
        conn.close()
        return
    else:
        raise ValueError(how)
    with conn:
        changed = conn.execute(
            f"UPDATE {table} SET {column} = CAST(? AS TEXT) WHERE digest = ?", (damaged, digest)
        ).rowcount
        assert changed == 1
    conn.close()


SQLITE_DAMAGE = [
    "invalid UTF-8",
    "invalid UTF-8 in the payload",
    "invalid UTF-8 in a column",
    "cut short",
    "a number",
    "fields missing",
]


@pytest.mark.slow  # a fresh process (about 5 s)
@pytest.mark.parametrize("how", SQLITE_DAMAGE)
def test_a_damaged_sqlite_row_is_invalid_for_its_digest_only(how, tmp_path, counts):
    """The run after the damage gives plain jobflow's outputs, runs only the damaged job (one
    warning naming it), and a sound entry replaces the damaged row: the next run is all hits."""
    expected = plain_outputs()
    assert run_here() == {"outputs": expected, "warnings": []}
    digest = add_digest()
    _damage_sqlite(digest, how)
    with CacheStore.from_settings() as cache:
        found = cache.lookup(digest)
        assert found.outcome is Outcome.INVALID
        assert cache.lookup(digest, serving=True).outcome is Outcome.INVALID
    counts.reset()

    second = run_victim(tmp_path / "second")
    assert second["outputs"] == expected
    (message,) = second["warnings"]
    assert "is not used" in message
    assert digest[:12] in message
    assert counts() == {"add": 1}, "only the damaged entry's job ran"

    third = run_here()
    assert third == {"outputs": expected, "warnings": []}
    assert counts() == {"add": 1}, "the sound entry replaced the damaged row"
    with CacheStore.from_settings() as cache:
        assert cache.lookup(digest).outcome is Outcome.HIT
        assert verify(cache) == []


@pytest.mark.parametrize("how", SQLITE_DAMAGE)
def test_cachetool_reports_and_repairs_a_damaged_sqlite_row(how, tmp_path):
    run_here()
    digest = add_digest()
    _damage_sqlite(digest, how)

    code, out = cachetool("verify", "--json")
    assert code == 1
    report = json.loads(out)
    assert [(p["kind"], p["digest"]) for p in report["problems"]] == [("undecodable", digest)]

    code, out = cachetool("ls", "--json")
    assert code == 0
    rows = {row["digest"]: row for row in json.loads(out)}
    assert len(rows) == 3, "the other entries are listed too"
    if how != "fields missing":  # an entry missing fields is still a document
        assert rows[digest]["name"] == "(unreadable)"
        assert rows[digest]["valid"] is False
        # the digest has a column of its own: the damaged row is still found by it
        code, out = cachetool("show", digest[:10])
        assert code == 1
        assert "is unreadable" in out
        assert "Traceback" not in out
    code, out = cachetool("stats")
    assert code == 0, out

    code, out = cachetool("verify", "--fix")
    assert code == 0, out
    assert "removed" in out
    code, out = cachetool("verify", "--json")
    assert code == 0
    assert json.loads(out)["problems"] == []
    with CacheStore.from_settings() as cache:
        assert cache.count() == 2
        assert cache.lookup(digest).outcome is Outcome.MISS


@pytest.mark.parametrize("where", ["doc", "payload", "column"])
def test_a_row_with_bytes_that_are_not_utf8_never_stops_a_listing(where, tmp_path):
    """Every read streams past the damaged row: the backend's own reads (one entry, whole
    documents, picked fields, counts and totals by column) give the other rows and a stand-in
    for it, never an error."""
    run_here()
    digest = add_digest()
    how = {"doc": "", "payload": " in the payload", "column": " in a column"}[where]
    _damage_sqlite(digest, "invalid UTF-8" + how)
    why = "a column" if where == "column" else "the stored row"
    stand_in = {"digest": digest, UNREADABLE: f"{why} does not decode (invalid UTF-8)"}
    with CacheStore.from_settings() as cache:
        backend = cache.backend
        assert backend.read(digest) == stand_in
        assert backend.read(digest, explain=False) == stand_in
        docs = {d["digest"]: d for d in backend.select({})}
        assert docs[digest] == stand_in
        assert len(docs) == 3
        assert all(UNREADABLE not in d for k, d in docs.items() if k != digest)
        served = {d["digest"]: d for d in backend.select({}, ["name", "output"])}
        assert served[digest] == stand_in
        small = {d["digest"]: d for d in backend.select({}, ["name", "function"])}
        if where != "payload":  # doc is read with every column
            assert small[digest] == stand_in
        else:  # the payload is not read for small fields: they are sound
            assert small[digest] == {
                "digest": digest,
                "name": "add",
                "function": "tests.support.jobs:add",
            }
        # criteria, counts and totals run on the columns alone: the damaged row never stops them
        assert [d["digest"] for d in backend.select({"digest": digest}, ["digest"])] == [digest]
        assert backend.count({"name": "add"}) == (1 if where == "column" else 2)
        totals = backend.totals()
        assert totals.entries == 3
        assert totals.functions == {"tests.support.jobs:add": 2, "tests.support.jobs:mul": 1}


# ------------------------------------------------------------------------- PostgreSQL rows

#: The damage done to an entry's doc (``<table>__e.doc``, JSON text): the text written, or None
#: for damage done otherwise. Bytes that are not UTF-8 cannot occur: a UTF-8 database refuses
#: them in any text column.
PG_DAMAGE = {
    "a number": "5",
    "a string": '"x"',
    "an array": "[1, 2]",
    "a JSON null": "null",
    "cut short": None,  # the stored text halved (bit rot, a torn copy: nothing parses doc)
    "fields missing": None,  # the entry reduced to {"digest": ..., "name": "add"}
}


@pytest.fixture
def pg_cache(pg_spec, monkeypatch) -> dict:
    monkeypatch.setenv("JOBFLOW_CACHE_STORE", json.dumps(pg_spec))
    return pg_spec


def _damage_pg(spec: dict, digest: str, how: str) -> None:
    """Damage the rows of ``digest`` as a hand with psycopg would: ``<table>__e`` holds a
    column per selectable field and ``doc``, ``<table>__p`` the payloads."""
    psycopg = pytest.importorskip("psycopg")

    def ident(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    entries, payloads = ident(spec["table"] + "__e"), ident(spec["table"] + "__p")
    with psycopg.connect(spec["uri"], autocommit=True) as conn:
        if how == "fields missing":
            # doc an empty object, every column but name NULL, no payload row: it reads back
            # as {"digest": ..., "name": "add"}, which decodes but is no cache entry
            nulls = ", ".join(f"{f} = NULL" for f in (*_OTHER_COLUMNS, "in_doc"))
            sql = f"UPDATE {entries} SET {nulls}, doc = '{{}}' WHERE digest = %s"
            assert conn.execute(sql, (digest,)).rowcount == 1
            assert conn.execute(f"DELETE FROM {payloads} WHERE digest = %s", (digest,)).rowcount
            return
        text = PG_DAMAGE[how]
        if how == "cut short":
            (doc,) = conn.execute(
                f"SELECT doc FROM {entries} WHERE digest = %s", (digest,)
            ).fetchone()
            text = doc[: len(doc) // 2]
        sql = f"UPDATE {entries} SET doc = %s WHERE digest = %s"
        assert conn.execute(sql, (text, digest)).rowcount == 1


@pytest.mark.slow  # a fresh process (about 5 s)
@pytest.mark.postgres
@pytest.mark.parametrize("how", sorted(PG_DAMAGE))
def test_a_damaged_postgres_document_is_invalid_for_its_digest_only(
    how, pg_cache, tmp_path, counts
):
    expected = plain_outputs()
    run_here()
    digest = add_digest()
    _damage_pg(pg_cache, digest, how)
    with CacheStore.from_settings() as cache:
        assert cache.lookup(digest).outcome is Outcome.INVALID
        assert cache.lookup(digest, serving=True).outcome is Outcome.INVALID
    counts.reset()

    code, out = cachetool("verify", "--json")
    problems = json.loads(out)["problems"]
    assert code == 1
    assert [(p["kind"], p["digest"]) for p in problems] == [("undecodable", digest)]
    for command in (["ls"], ["stats"], ["ls", "--json"]):
        code, out = cachetool(*command)
        assert code == 0, out
    rows = {row["digest"]: row for row in json.loads(out)}
    assert len(rows) == 3
    if how != "fields missing":  # an entry missing fields is still a document
        assert rows[digest]["name"] == "(unreadable)"

    second = run_victim(tmp_path / "second")
    assert second["outputs"] == expected
    # a JSON null too: the row is there, its doc is no document (no longer read as a miss)
    (message,) = second["warnings"]
    assert "is not used" in message
    assert digest[:12] in message
    assert counts() == {"add": 1}, "only the damaged entry's job ran"
    third = run_here()
    assert third == {"outputs": expected, "warnings": []}
    assert counts() == {"add": 1}, "the sound entry replaced the damaged document"
    code, out = cachetool("verify", "--json")
    assert code == 0, out


@pytest.mark.postgres
@pytest.mark.parametrize("how", ["a number", "an array", "cut short"])
def test_verify_fix_removes_a_damaged_postgres_document(how, pg_cache, tmp_path):
    run_here()
    digest = add_digest()
    _damage_pg(pg_cache, digest, how)
    code, out = cachetool("show", digest[:10])
    assert code == 1
    assert "is unreadable" in out
    code, out = cachetool("verify", "--fix")
    assert code == 0, out
    assert "removed" in out
    with CacheStore.from_settings() as cache:
        assert cache.count() == 2
        assert verify(cache) == []
        assert cache.lookup(digest).outcome is Outcome.MISS


# ------------------------------------------------------------- the store file gone mid-run

GONE_FLOW = """
import json, os, sys, warnings
from pathlib import Path
from jobflow import Flow, JobStore, job
from maggma.stores import MemoryStore
from jobflow_cache import CacheWarning, run_locally
from tests.support import fault_jobs
how, path = sys.argv[1], sys.argv[2]
flow = fault_jobs.sabotaged_flow(how, path)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    out = run_locally(flow, store=JobStore(MemoryStore()), log=False, ensure_success=True)
print(json.dumps({
    "outputs": [out[j.uuid][1].output for j in flow],
    "warnings": [str(w.message) for w in seen if issubclass(w.category, CacheWarning)],
}))
"""


@pytest.mark.slow  # a fresh process (about 5 s)
def test_a_store_deleted_mid_run_is_made_again_and_keeps_the_rest_of_the_run(
    tmp_path, isolated_cache, counts
):
    """The SQLite file (with its -wal and -shm) is deleted between two jobs: one warning says
    so, and the entries of the jobs after it are in the file made again (before the fix they
    went into the deleted file, silently)."""
    path = isolated_cache / "cache.sqlite"
    run_locally(jobs.add(0, 0), log=False)  # the store exists
    proc = subprocess.run(
        [sys.executable, "-c", GONE_FLOW, "delete", str(path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["outputs"] == [2, 20, 20, 21, 210]
    (message,) = result["warnings"]
    assert "was deleted while in use; reopened it" in message
    with CacheStore.from_settings() as cache:
        names = sorted(d["name"] for d in cache.find())
    # the jobs after the deletion (add_one(20) -> 21, times_ten(21)) are in the new file;
    # the sabotage job itself ends after the deletion too
    assert "times_ten" in names, names
    assert "add_one" in names, names


# ------------------------------------------------------------------------- a full disk


@pytest.fixture
def full_cache_dir(tmp_path, monkeypatch) -> Iterator[Callable[[], Path]]:
    """The cache folder (store and objects) on a 2 MiB file system of its own (tmpfs, else an
    ext4 image on a loop device), filled up by the returned function. Skips where mounting is
    not permitted."""
    point = tmp_path / "small"
    point.mkdir()
    tried = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2048k,mode=755", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if tried.returncode != 0:
        image = tmp_path / "small.img"
        with open(image, "wb") as fh:
            fh.truncate(4 << 20)
        for step in (
            ["mkfs.ext4", "-q", "-m", "0", str(image)],
            ["mount", "-o", "loop", str(image), str(point)],
        ):
            try:
                done = subprocess.run(step, capture_output=True, text=True, check=False)
            except FileNotFoundError as err:
                pytest.skip(f"no small file system here: {tried.stderr.strip()}; {err}")
            if done.returncode != 0:
                pytest.skip(f"cannot mount a small file system here: {done.stderr.strip()}")
    monkeypatch.setenv("JOBFLOW_CACHE_DIR", str(point))

    def fill() -> Path:
        filler = point / "filler"
        with open(filler, "wb", buffering=0) as fh:
            for size in (65536, 4096, 512, 1):
                try:
                    while True:
                        fh.write(b"\0" * size)
                except OSError:
                    pass
        return filler

    yield fill
    subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize("files_mode", ["copy", "link"])
def test_a_full_cache_folder_is_one_warning_per_run(
    files_mode, full_cache_dir, tmp_path, monkeypatch, counts
):
    """Six jobs write files into a cache folder whose file system is full, six more return
    values: every job runs and succeeds with plain jobflow's outputs, and the run gives ONE
    warning (it gave one per job); the next run warns once again, and with space freed the
    cache records again."""
    monkeypatch.setenv("JOBFLOW_CACHE_FILES", files_mode)
    run_locally(jobs.add(0, 0), log=False)  # the store exists before the disk fills up
    filler = full_cache_dir()

    def flow() -> Flow:
        return Flow(
            [jobs.write_files(f"t{i}", 2000) for i in range(6)] + [jobs.add(i, 1) for i in range(6)]
        )

    for attempt in ("first", "second"):
        one = flow()
        store = JobStore(MemoryStore())
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            run_locally(
                one,
                store=store,
                log=False,
                ensure_success=True,
                create_folders=True,
                root_dir=tmp_path / attempt,
            )
        messages = [str(w.message) for w in seen if issubclass(w.category, CacheWarning)]
        assert len(messages) == 1, messages
        assert "file system is full" in messages[0] or "disk is full" in messages[0]
        assert [store.get_output(j.uuid)["tag"] for j in one.jobs[:6]] == [
            f"t{i}" for i in range(6)
        ]
        assert [store.get_output(j.uuid) for j in one.jobs[6:]] == [i + 1 for i in range(6)]
    assert counts()["write_files"] == 12

    filler.unlink()
    run_locally(flow(), log=False, create_folders=True, root_dir=tmp_path / "freed")
    counts.reset()
    run_locally(flow(), log=False, create_folders=True, root_dir=tmp_path / "served")
    assert counts() == {}, "recorded once space was freed"
