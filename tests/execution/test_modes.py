"""Cache modes (issue 13, part 3): ``read_only`` serves hits and never writes to the store;
``refresh`` never serves, recomputes and replaces the entry.

A mode comes from the ``MODE`` setting (``JOBFLOW_CACHE_MODE``), ``@cached_job(mode=...)``,
``cache_flow(flow, mode=...)`` or ``metadata["jobflow_cache"]["mode"]`` (which wins).
read_only is checked against a real PostgreSQL role that may only SELECT: any write errors.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jobflow import Flow, JobStore, Response, job
from jobflow import run_locally as jobflow_run_locally

from jobflow_cache import CacheWarning, cache_flow, cached_job
from jobflow_cache import run_locally as jfc_run_locally
from tests.conftest import ROOT, Counts, run_python
from tests.support import jobs


# -- jobs of this module (importable by path in the subprocesses) ------------------------------
@job
def env_value(x: int):
    """Its result depends on a variable its digest does not see (so a stale entry shows)."""
    jobs.executed("env_value")
    return x + int(os.environ.get("JFC_MODE_VALUE", "0"))


@cached_job(mode="refresh")
def always_refreshed(x: int):
    jobs.executed("always_refreshed")
    return x + int(os.environ.get("JFC_MODE_VALUE", "0"))


@job
def fan_out(n: int):
    jobs.executed("fan_out")
    return Response(replace=Flow([jobs.add(i, 1) for i in range(n)]))


def run(flow: Flow, store: JobStore, **kwargs: Any) -> dict[str, Any]:
    responses = jfc_run_locally(flow, store=store, ensure_success=True, log=False, **kwargs)
    return {uuid: r[max(r)].output for uuid, r in responses.items()}


def meta(store: JobStore, job_: Any) -> dict[str, Any]:
    doc = store.query_one({"uuid": job_.uuid}, sort={"index": -1})
    return (doc.get("metadata") or {}).get("jobflow_cache") or {}


def sqlite_rows(cache_dir: Path) -> list[tuple[Any, ...]]:
    """Every row of every table of the embedded store's files (exact, hits included)."""
    rows: list[tuple[Any, ...]] = []
    for path in sorted(cache_dir.rglob("*.sqlite")):
        if "contents" in path.parts:  # the host's content-digest memo, not the store
            continue
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'"):
                for row in conn.execute(f'SELECT * FROM "{table}"'):
                    rows.append((path.name, table, *row))
    return sorted(rows, key=repr)


def object_files(cache_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*") if p.is_file())


# -- read_only ---------------------------------------------------------------------------------
def test_read_only_serves_hits_and_writes_nothing(
    counts: Counts, job_store: JobStore, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = jobs.write_files("a")
    run(Flow([recorded, jobs.add(1, 2), fan_out(2)]), job_store, create_folders=True)
    assert counts() == {"write_files": 1, "add": 3, "fan_out": 1}
    rows = sqlite_rows(isolated_cache)
    objects = [f for f in object_files(isolated_cache) if "contents" not in f]
    assert rows
    assert objects  # write_files' two files are in the object area

    counts.reset()
    monkeypatch.setenv("JOBFLOW_CACHE_MODE", "read_only")
    hit, new = jobs.write_files("a"), jobs.write_files("b")
    dynamic_hit, dynamic_new = fan_out(2), fan_out(3)
    flow = Flow([hit, new, jobs.add(1, 2), jobs.add(5, 5), dynamic_hit, dynamic_new])
    outputs = run(flow, job_store, create_folders=True)
    # served: the recorded ones (dynamic children included); run: the new ones
    # add(5, 5), and add(2, 1) of the new fan-out (its add(0, 1) and add(1, 1) hit)
    assert counts() == {"write_files": 1, "add": 2, "fan_out": 1}
    assert meta(job_store, hit)["outcome"] == "hit"
    assert meta(job_store, new)["outcome"] == "miss"
    assert "read_only" in meta(job_store, new)["reason"]
    assert outputs[hit.uuid]["tag"] == "a"
    assert Path(outputs[hit.uuid]["dir_name"], "result.txt").read_text() == "a\n" * 10
    # nothing written: the same rows (entries, hit counts, aliases, claims) and objects
    assert sqlite_rows(isolated_cache) == rows
    assert [f for f in object_files(isolated_cache) if "contents" not in f] == objects

    counts.reset()
    monkeypatch.delenv("JOBFLOW_CACHE_MODE")
    run(Flow([jobs.write_files("b"), fan_out(3)]), job_store, create_folders=True)
    # nothing was recorded: they run again (add(2, 1) too)
    assert counts() == {"write_files": 1, "fan_out": 1, "add": 1}


@pytest.fixture
def read_only_role(postgres_uri: str, pg_table: str) -> str:
    """A role that may only SELECT from the store's tables (made after they exist): its URI."""
    import psycopg

    role = f"ro_{pg_table}"
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        # with a password: a server's host lines usually ask for one (scram-sha-256 on Debian)
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{role}'")
        conn.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
    yield role
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        conn.execute(f'DROP OWNED BY "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


def pg_tables(table: str) -> list[str]:
    """The tables of a PostgresBackend on ``table``: schema version, entries, payloads,
    consumed pairs, claims and aliases."""
    return [f"{table}{suffix}" for suffix in ("__v", "__e", "__p", "__c", "_claims", "_aliases")]


def grant_select(postgres_uri: str, table: str, role: str) -> None:
    import psycopg

    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        for name in pg_tables(table):
            conn.execute(f'GRANT SELECT ON "{name}" TO "{role}"')


def pg_rows(postgres_uri: str, table: str) -> dict[str, list[Any]]:
    import psycopg

    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        return {
            name: sorted(
                json.dumps(row, default=str, sort_keys=True)
                for row in conn.execute(f'SELECT * FROM "{name}"').fetchall()
            )
            for name in pg_tables(table)
        }


def user_uri(postgres_uri: str, role: str) -> str:
    import psycopg

    params = psycopg.conninfo.conninfo_to_dict(postgres_uri)
    params["user"] = role
    params["password"] = role  # as read_only_role made it
    return psycopg.conninfo.make_conninfo(**params)


#: One fresh process: the flow of the read_only test, run by ``runner``; prints counts of
#: outcomes. Warnings are errors there: a CacheWarning (a refused write, say) fails it.
PG_PROGRAM = """
import json, warnings
warnings.simplefilter("error")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="Some jobs are not connected")
from jobflow import Flow, JobStore
from maggma.stores import MemoryStore
from jobflow_cache import cache_flow
from tests.support import jobs
from tests.execution.test_modes import fan_out
runner, values, mark = {runner!r}, {values!r}, {mark!r}
flow = Flow([jobs.write_files(v) for v in values] + [fan_out(len(values))])
if mark is not None:
    cache_flow(flow, **mark)
store = JobStore(MemoryStore())
store.connect()
if runner == "jobflow":
    from jobflow import run_locally
    run_locally(flow, store=store, ensure_success=True, create_folders=True)
else:
    from jobflow_cache import run_locally
    run_locally(flow, store=store, ensure_success=True, create_folders=True, log=False)
outcomes = [
    (d["name"], (d.get("metadata") or {{}}).get("jobflow_cache", {{}}).get("outcome"))
    for d in store.query({{}})
]
print(json.dumps(sorted(outcomes, key=str)))
"""


@pytest.mark.postgres
@pytest.mark.slow  # fresh processes
@pytest.mark.parametrize(
    ("runner", "how"),
    # the setting in our run_locally; the mark's mode under jobflow's manager, where uuids and
    # folders would be recorded in the store for other processes (the per-job option)
    [("jobflow_cache", "setting"), ("jobflow", "cache_flow")],
)
def test_read_only_against_a_select_only_postgres_role(
    runner: str,
    how: str,
    counts: Counts,
    postgres_uri: str,
    pg_table: str,
    read_only_role: str,
) -> None:
    """The owner records; a role that may only SELECT serves hits, runs the rest, cleanly.

    With DEDUP (claims) and outside run_locally (jobflow's manager: uuids and folders are
    recorded in the store for other processes) every write path would be taken.
    """
    spec = json.dumps({"type": "PostgresBackend", "uri": postgres_uri, "table": pg_table})
    env = {"JOBFLOW_CACHE_STORE": spec, "JOBFLOW_CACHE_DEDUP": "1"}
    # recorded by the owner (jobflow's run_locally caches marked flows only)
    code = PG_PROGRAM.format(runner=runner, values=["a", "b"], mark={})
    run_python(code, env=env)
    assert counts() == {"write_files": 2, "fan_out": 1, "add": 2}
    grant_select(postgres_uri, pg_table, read_only_role)
    before = pg_rows(postgres_uri, pg_table)
    assert len(before[f"{pg_table}__e"]) == 5  # the entries

    counts.reset()
    ro_spec = json.dumps(
        {
            "type": "PostgresBackend",
            "uri": user_uri(postgres_uri, read_only_role),
            "table": pg_table,
        }
    )
    ro_env = {**env, "JOBFLOW_CACHE_STORE": ro_spec}
    if how == "setting":
        ro_env["JOBFLOW_CACHE_MODE"] = "read_only"
        mark = {}
    else:
        mark = {"mode": "read_only"}
    # a, b were recorded: served; c is new and the fan-out of 3 too: they run
    code = PG_PROGRAM.format(runner=runner, values=["a", "b", "c"], mark=mark)
    outcomes = json.loads(run_python(code, env=ro_env).strip().splitlines()[-1])
    assert counts() == {"write_files": 1, "fan_out": 1, "add": 1}  # add(0, 1), add(1, 1) hit
    got = [o for _, o in outcomes if o is not None]
    assert got.count("hit") == 4, outcomes
    assert got.count("miss") == 3, outcomes
    assert pg_rows(postgres_uri, pg_table) == before  # nothing written at all

    # and the role really cannot write: the same flow in readwrite warns and runs uncached
    counts.reset()
    ro_env.pop("JOBFLOW_CACHE_MODE", None)
    code = PG_PROGRAM.format(runner=runner, values=["d"], mark={})
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), **ro_env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert "permission denied" in proc.stdout + proc.stderr
    assert counts() == {"write_files": 1, "fan_out": 1}  # the jobs still ran (add(0, 1) hit)
    assert pg_rows(postgres_uri, pg_table) == before


# -- refresh -----------------------------------------------------------------------------------
def test_refresh_recomputes_and_replaces_the_entry(
    counts: Counts, job_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JFC_MODE_VALUE", "1")
    first = env_value(10)
    assert run(Flow([first]), job_store)[first.uuid] == 11
    monkeypatch.setenv("JFC_MODE_VALUE", "2")  # the digest cannot see it: a stale hit
    stale = env_value(10)
    assert run(Flow([stale]), job_store)[stale.uuid] == 11
    assert counts() == {"env_value": 1}

    counts.reset()
    monkeypatch.setenv("JOBFLOW_CACHE_MODE", "refresh")
    fresh = env_value(10)
    assert run(Flow([fresh]), job_store)[fresh.uuid] == 12
    assert counts() == {"env_value": 1}
    assert meta(job_store, fresh)["outcome"] == "miss"
    assert "refresh" in meta(job_store, fresh)["reason"]
    assert meta(job_store, fresh)["digest"] == meta(job_store, first)["digest"]

    counts.reset()
    monkeypatch.delenv("JOBFLOW_CACHE_MODE")
    served = env_value(10)
    assert run(Flow([served]), job_store)[served.uuid] == 12  # the replaced entry
    assert counts() == {}
    assert meta(job_store, served)["source_uuid"] == fresh.uuid


def test_refresh_under_jobflow_run_locally_with_cache_flow(
    counts: Counts, job_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mark's mode, outside run_locally (entries written at once), dynamic jobs too."""
    flow = cache_flow(Flow([fan_out(2)]))
    jobflow_run_locally(flow, store=job_store, ensure_success=True)
    counts.reset()
    flow = cache_flow(Flow([fan_out(2)]), mode="refresh")
    jobflow_run_locally(flow, store=job_store, ensure_success=True)
    assert counts() == {"fan_out": 1, "add": 2}  # the children inherit the mode
    counts.reset()
    flow = cache_flow(Flow([fan_out(2)]))
    jobflow_run_locally(flow, store=job_store, ensure_success=True)
    assert counts() == {}


@pytest.mark.parametrize("source", ["setting", "decorator", "cache_flow", "metadata"])
def test_every_source_of_the_mode(
    source: str, counts: Counts, job_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build() -> Any:
        if source == "decorator":
            return always_refreshed(1)
        j = env_value(1)
        if source == "metadata":
            j.update_metadata({"jobflow_cache": {"mode": "refresh"}})
        return j

    if source == "decorator":
        # recorded by a readwrite copy of the same function's digest: metadata says readwrite
        j = always_refreshed(1)
        j.update_metadata({"jobflow_cache": {"mode": "readwrite"}})
        run(Flow([j]), job_store)
        counts.reset()
        again = always_refreshed(1)
        again.update_metadata({"jobflow_cache": {"mode": "readwrite"}})
        run(Flow([again]), job_store)
        assert counts() == {}  # readwrite in metadata wins over the decorator: served
    else:
        run(Flow([env_value(1)]), job_store)
    counts.reset()
    if source == "setting":
        monkeypatch.setenv("JOBFLOW_CACHE_MODE", "refresh")
    flow = Flow([build()])
    if source == "cache_flow":
        cache_flow(flow, mode="refresh")
    run(flow, job_store)
    assert sum(counts().values()) == 1, f"{source}: not refreshed"


@pytest.mark.warnings_logged
def test_a_bad_mode_warns_and_the_job_runs(counts: Counts, job_store: JobStore) -> None:
    j = jobs.add(1, 2)
    j.update_metadata({"jobflow_cache": {"mode": "sometimes"}})
    with pytest.warns(CacheWarning, match="sometimes"):
        out = run(Flow([j]), job_store)
    assert out[j.uuid] == 3
    assert counts() == {"add": 1}
    assert meta(job_store, j)["outcome"] == "uncacheable"


def test_bad_mode_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobflow_cache.errors import SettingsError
    from jobflow_cache.settings import CacheSettings

    monkeypatch.setenv("JOBFLOW_CACHE_MODE", "readonly")
    with pytest.raises((SettingsError, ValueError)):
        CacheSettings()


def test_read_only_without_a_store_creates_none(
    counts: Counts, job_store: JobStore, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded store does not exist: nothing to serve, and it is not created."""
    flow = cache_flow(Flow([jobs.add(1, 2), fan_out(2)]), mode="read_only")
    jobflow_run_locally(flow, store=job_store, ensure_success=True)
    monkeypatch.setenv("JOBFLOW_CACHE_MODE", "read_only")
    again = jobs.add(1, 2)
    assert run(Flow([again]), job_store)[again.uuid] == 3
    assert counts() == {"add": 1 + 2 + 1, "fan_out": 1}
    assert not isolated_cache.exists()
    assert meta(job_store, again) == {
        "outcome": "miss",
        "reason": "read_only: not in the cache, and not recorded",
    }
