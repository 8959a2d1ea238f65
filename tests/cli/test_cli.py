"""cachetool through click's CliRunner and as the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from jobflow import Flow, JobStore
from maggma.stores import MemoryStore
from monty.serialization import dumpfn

from jobflow_cache import (
    CacheEntry,
    CacheSettings,
    CacheStore,
    CacheWarning,
    ObjectArea,
    StoreUnavailableError,
    __version__,
    run_locally,
)
from jobflow_cache.cli import cli
from jobflow_cache.hashing.canonical import SCHEME
from tests.support import jobs


def test_info_reports_the_embedded_store(isolated_cache, run_dir, counts):
    run_locally(jobs.add(1, 2), log=False)
    result = CliRunner().invoke(cli, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["entries"] == 1
    assert str(isolated_cache / "cache.sqlite") in data["store"]
    assert data["objects_dir"] == str(isolated_cache / "objects")


def test_version_and_help():
    runner = CliRunner()
    assert __version__ in runner.invoke(cli, ["--version"]).output
    assert "Examples" in runner.invoke(cli, ["--help"]).output


def test_installed_console_script(isolated_cache, run_dir):
    exe = shutil.which("cachetool") or os.path.join(os.path.dirname(os.sys.executable), "cachetool")
    if not os.path.exists(exe):
        pytest.skip("the cachetool console script is not installed in this environment")
    run_locally(jobs.add(4, 4), log=False)
    proc = subprocess.run([exe, "info", "--json"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["entries"] == 1


def test_a_blocked_cache_dir_is_no_traceback_and_nothing_is_created(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("JOBFLOW_CACHE_DIR", str(blocker / "sub"))
    proc = subprocess.run([console_script(), "info"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stderr.startswith("No cache at ")
    assert "Traceback" not in proc.stderr
    assert blocker.read_text() == ""


# --------------------------------------------------------------------------- the full CLI
# A cache built by two runs of a real flow: the second changes the relaxation's input, so the
# relaxation and the job using its output miss, and write_files is served from the cache.


def flow(value: float) -> Flow:
    relax = jobs.RelaxMaker(name="relax").make(value)
    shift = jobs.add(relax.output["value"], 1)
    return Flow([relax, shift, jobs.write_files("t", 5)])


@pytest.fixture
def built(isolated_cache, tmp_path, counts):
    root = tmp_path / "runs"
    root.mkdir()
    docs = {"type": "JSONStore", "paths": str(tmp_path / "jobs.json"), "read_only": False}
    spec = {"docs_store": {**docs, "collection_name": "outputs", "key": "uuid"}}
    job_store = JobStore.from_dict_spec(spec)
    flows = [flow(1.0), flow(2.0)]
    dumpfn(flows[1], tmp_path / "flow.json")  # as submitted: inputs hold output references
    for each in flows:
        run_locally(each, store=job_store, create_folders=True, root_dir=root, log=False)
    assert counts() == {"relax": 2, "add": 2, "write_files": 1}
    return SimpleNamespace(flows=flows, jobstore=json.dumps(spec), root=root, tmp=tmp_path)


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input)


def ok(*args: str, input: str | None = None):
    result = invoke(*args, input=input)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def as_json(*args: str):
    return json.loads(ok(*args, "--json").stdout)


def entries() -> list[dict]:
    return as_json("ls", "--limit", "0")


def digest_of(name: str, which: int = 0) -> str:
    """Full digest of the ``which``-th newest entry called ``name``."""
    return [e["digest"] for e in entries() if e["name"] == name][which]


def one_line_error(result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in result.stderr
    return lines[0]


def test_help_everywhere_has_examples():
    for command in [[], *([name] for name in cli.commands)]:
        result = ok(*command, "--help")
        assert "Examples:" in result.stdout, command
        assert ok(*command, "-h").stdout == result.stdout


def test_ls_table_filters_sort_and_json(built):
    table = ok("ls").stdout.splitlines()
    assert table[0].split() == [
        "DIGEST", "NAME", "FUNCTION", "CREATED", "LAST", "HIT", "HITS", "FILES", "VALID"
    ]  # fmt: skip
    assert len(table) == 6
    rows = entries()
    assert [r["name"] for r in rows] == ["add", "relax", "write_files", "add", "relax"]
    assert all(len(r["short"]) == 8 and r["digest"].startswith(r["short"]) for r in rows)
    assert {r["short"] for r in rows} == {line.split()[0] for line in table[1:]}
    files = next(r for r in rows if r["name"] == "write_files")
    assert (files["files"], files["files_size"], files["hits"]) == (2, 15, 1)
    assert next(line for line in table if "write_files" in line).split()[-2:] == ["B)", "yes"]

    assert [r["name"] for r in as_json("ls", "--name", "rel*")] == ["relax", "relax"]
    assert len(as_json("ls", "--function", "tests.support.jobs:add")) == 2
    assert [r["name"] for r in as_json("ls", "--sort", "hits", "--limit", "1")] == ["write_files"]
    assert [r["name"] for r in as_json("ls", "-r", "-n", "1")] == ["relax"]  # oldest first
    assert len(as_json("ls", "--since", "1h")) == 5
    assert as_json("ls", "--before", "2000-01-01") == []
    assert as_json("ls", "--invalid") == []
    empty = ok("ls", "--before", "1h")
    assert (empty.stdout, empty.stderr) == ("", "No entries.\n")
    limited = ok("ls", "-n", "2")
    assert len(limited.stdout.splitlines()) == 3
    assert "--limit 0" in limited.stderr
    assert invoke("ls", "--sort", "bogus").exit_code == 2
    assert invoke("ls", "--since", "someday").exit_code == 2


def test_show_text_json_and_prefix_errors(built):
    relax = built.flows[1][0]
    digest = digest_of("relax")
    text = ok("show", digest[:6]).stdout
    for expected in (
        f"digest    {digest}",
        "function  tests.support.jobs:RelaxMaker.make",
        "status    served on a hit",
        "RelaxMaker(name='relax', settings={}, steps=10)",
        "value  ",
        '"value": 4.0,',  # the output as indented JSON, one field a line
        '"steps": 10,',
        "OUTCAR",
        f"  source job    {relax.uuid} (index 1)",
        "  scheme        jfc2",
    ):
        assert expected in text, expected
    data = as_json("show", digest[:6].upper())
    assert (data["digest"], data["name"], data["status"]) == (digest, "relax", "served on a hit")
    assert data["canonical_input"]["value"] == 2.0
    assert json.loads(data["output"])["value"] == 4.0

    with CacheStore.from_settings() as cache:
        for tail in ("0" * 26, "1" * 26):
            cache.put(CacheEntry(digest="abc123" + tail, scheme="jfc1", function="m:f", name="t"))
    error = one_line_error(invoke("show", "abc1"))
    assert error.startswith("Error: digest prefix 'abc1' is ambiguous: ")
    assert "abc123" + "0" * 26 in error
    assert "abc123" + "1" * 26 in error
    assert "no cache entry" in one_line_error(invoke("show", "ffff0000"))
    usage = invoke("show", "xyz")
    assert (usage.exit_code, usage.stdout) == (2, "")
    assert usage.stderr.splitlines()[-1] == (
        "Error: Invalid value for 'DIGEST': 'xyz' is not a digest prefix (4 to 32 hex digits)"
    )


def test_invalidate_keeps_the_entry_but_it_is_never_served(built, counts, tmp_path):
    digest = digest_of("write_files")
    result = ok("invalidate", digest[:8], "--reason", "bad potcar")
    assert result.stdout == f"invalidated {digest[:8]}: bad potcar\n"
    (row,) = as_json("ls", "--invalid")
    assert (row["digest"], row["valid"], row["invalid_reason"]) == (digest, False, "bad potcar")
    assert "not served: marked invalid: bad potcar" in ok("show", digest[:8]).stdout
    with pytest.warns(CacheWarning, match="bad potcar"):
        run_locally(jobs.write_files("t", 5), log=False, create_folders=True, root_dir=tmp_path)
    assert counts()["write_files"] == 2


def objects_on_disk(cache_dir: Path) -> list[str]:
    return sorted(xxh3 for xxh3, _ in ObjectArea(cache_dir / "objects").iter_objects())


def test_purge_asks_and_dry_run_deletes_nothing(built, isolated_cache):
    before = objects_on_disk(isolated_cache)
    assert len(before) == 4  # two OUTCARs, result.txt, sub/data.bin
    assert invoke("purge").exit_code == 2
    assert invoke("purge", "--all", "--name", "x").exit_code == 2

    dry = ok("purge", "--all", "--dry-run")
    assert "Dry run, nothing deleted: would remove 5 entries and 4 file objects, " in dry.stdout
    data = as_json("purge", "--all", "--dry-run")
    assert (data["entries"], data["gc"]["objects"], data["dry_run"]) == (5, 4, True)
    refused = invoke("purge", "--name", "relax", input="n\n")
    assert refused.exit_code == 1
    assert "Remove 2 entries? [y/N]" in refused.stderr
    assert len(entries()) == 5
    assert objects_on_disk(isolated_cache) == before

    done = ok("purge", "--name", "relax", input="y\n")
    assert "Removed 2 entries and 2 file objects, " in done.stdout
    assert [e["name"] for e in entries()] == ["add", "write_files", "add"]
    assert len(objects_on_disk(isolated_cache)) == 2
    assert ok("verify").exit_code == 0


def test_purge_by_digest_age_and_use(built):
    digest = digest_of("add", 1)
    data = as_json("purge", "--digest", digest[:8], "--yes")
    assert (data["entries"], data["digests"], data["gc"]["objects"]) == (1, [digest], 0)
    assert as_json("purge", "--older-than", "30d", "--yes")["entries"] == 0
    with CacheStore.from_settings() as cache:
        doc = dict(next(cache.find({"name": "relax"}, sort={"created": 1})))
        doc["created"] = datetime.now(timezone.utc) - timedelta(days=45)
        cache.backend.write([doc])
    assert as_json("purge", "--unused-for", "60d", "--yes")["entries"] == 0
    assert as_json("purge", "--unused-for", "30d", "--yes")["digests"] == [doc["digest"]]
    assert [e["name"] for e in entries()] == ["add", "relax", "write_files"]
    assert ok("purge", "--since", "1h", "--function", "tests.support.jobs:add", "-y").exit_code == 0
    assert [e["name"] for e in entries()] == ["relax", "write_files"]


def test_gc_collects_unreferenced_objects_only(built, isolated_cache, tmp_path):
    orphan = tmp_path / "orphan"
    orphan.write_text("nobody uses me")
    xxh3 = ObjectArea(isolated_cache / "objects").ingest(orphan, mode="copy")
    os.utime(ObjectArea(isolated_cache / "objects").path_of(xxh3), (0, 0))
    assert as_json("gc", "--dry-run")["objects"] == 1
    assert xxh3 in objects_on_disk(isolated_cache)
    assert ok("gc", "--yes").stdout == "Deleted 1 file object, 14 B\n"
    assert xxh3 not in objects_on_disk(isolated_cache)
    assert len(objects_on_disk(isolated_cache)) == 4
    assert ok("gc", "--yes").stdout == "Deleted 0 file objects, 0 B\n"


def test_verify_reports_by_kind_and_fixes(built, isolated_cache):
    sound = ok("verify")
    assert sound.stdout == "Checked 5 entries: all sound.\n"
    area = ObjectArea(isolated_cache / "objects")
    with CacheStore.from_settings() as cache:
        entry = CacheEntry.from_document(next(cache.find({"name": "write_files"})))
        doc = dict(next(cache.find({"name": "add"})))
        doc["output"] = "999"
        cache.backend.write([doc])
    area.path_of(entry.files[0].xxh3).unlink()

    result = invoke("verify")
    assert result.exit_code == 1
    assert "checksum (1):" in result.stdout
    assert "file-missing (1):" in result.stdout
    assert f"  {entry.digest[:12]}  {entry.files[0].path}: missing" in result.stdout
    assert result.stdout.endswith("Checked 5 entries: 2 problems in 2 entries.\n")
    report = json.loads(invoke("verify", "--json").stdout)
    assert report["sound"] is False
    assert {(p["kind"], p["digest"]) for p in report["problems"]} == {
        ("checksum", doc["digest"]),
        ("file-missing", entry.digest),
    }
    assert json.loads(invoke("verify", "--json", "--name", "add").stdout)["checked"] == 2
    assert invoke("verify", "--function", "tests.support.jobs:RelaxMaker.make").exit_code == 0

    fixed = invoke("verify", "--fix")
    assert fixed.exit_code == 0, "everything found was fixed"
    assert "[invalidated]" in fixed.stdout
    assert fixed.stdout.endswith("Checked 5 entries: 2 problems in 2 entries, all fixed.\n")
    assert ok("verify").stdout == "Checked 5 entries: all sound.\n"
    assert {e["name"] for e in as_json("ls", "--invalid")} == {"add", "write_files"}


def test_stats(built):
    data = as_json("stats")
    assert (data["entries"], data["invalid"], data["hits"]) == (5, 0, 1)
    assert data["functions"] == {
        "tests.support.jobs:RelaxMaker.make": 2,
        "tests.support.jobs:add": 2,
        "tests.support.jobs:write_files": 1,
    }
    assert data["objects"] == 4
    assert data["files_bytes"] == data["objects_bytes"]
    text = ok("stats", "--top", "1").stdout
    assert "entries      5 (0 invalid)" in text
    assert "created      just now .. just now" in text
    assert "      2  tests.support.jobs:RelaxMaker.make" in text
    assert "... 2 more (--top 0 lists all)" in text


def test_explain_an_entry_a_job_uuid_and_a_job_file(built):
    relax_now = digest_of("relax", 0)
    data = as_json("explain", relax_now[:8])
    best = data["nearest"][0]
    assert (best["equal"], best["changed"]) == (["self"], ["value"])
    assert best["differences"] == [{"path": "value", "cached": "1.0", "now": "2.0"}]
    text = ok("explain", relax_now[:8]).stdout
    assert "     value: 1.0 -> 2.0" in text

    second = built.flows[1]
    missed = ok("explain", second[1].uuid, "--jobstore", built.jobstore).stdout
    assert f"Job add ({second[1].uuid}): miss (digest {digest_of('add', 0)})." in missed
    assert "     a: 2.0 -> 4.0" in missed
    served = ok("explain", second[2].uuid, "--jobstore", built.jobstore).stdout
    assert f"was served from entry {digest_of('write_files')}" in served
    assert f"recorded by job {built.flows[0][2].uuid}" in served

    path = built.tmp / "flow.json"
    result = invoke("explain", "--job", str(path))
    assert "holds 3 jobs, choose one with --uuid" in one_line_error(result)
    args = ["explain", "--job", str(path), "--uuid", second[1].uuid]
    unresolved = ok(*args).stdout
    assert "digest unknown, some inputs are output references (see --jobstore):" in unresolved
    assert f"  a: output of job {second[0].uuid}['value']" in unresolved
    assert "same: b" in unresolved
    resolved = as_json(*args, "--jobstore", built.jobstore)
    assert resolved["job"]["digest"] == digest_of("add", 0)
    assert "would be served from the cache" in resolved["summary"][0]

    fresh = flow(3.0)
    dumpfn(fresh, path)
    data = as_json(
        "explain", "--job", str(path), "--uuid", fresh[1].uuid, "--jobstore", built.jobstore
    )
    assert "not found in the JobStore" in data["summary"][0]
    assert data["job"]["unresolved"] == {"a": f"output of job {fresh[0].uuid}['value']"}
    data = as_json("explain", "--job", str(path), "--uuid", fresh[0].uuid)
    assert "not cached" in data["summary"][0]
    assert [c["differences"][0]["now"] for c in data["nearest"]] == ["3.0", "3.0"]
    assert invoke("explain").exit_code == 2


def test_store_option_spec_forms_and_errors(built, isolated_cache, tmp_path):
    spec = {
        "type": "SQLiteStore",
        "path": str(isolated_cache / "cache.sqlite"),
        "collection_name": "entries",
        "key": "digest",
    }
    assert len(as_json("--store", json.dumps(spec), "ls")) == 5  # 0.1.0's spec of the file
    backend = {"type": "SQLiteBackend", "path": spec["path"]}
    assert len(as_json("--store", json.dumps(backend), "ls")) == 5
    yaml_file = tmp_path / "store.yaml"
    yaml_file.write_text("".join(f"{k}: {v}\n" for k, v in spec.items()))
    assert as_json("--store", str(yaml_file), "stats")["entries"] == 5
    assert "malformed store spec" in one_line_error(invoke("--store", "{oops", "ls"))
    error = one_line_error(invoke("--store", str(tmp_path / "none.yaml"), "ls"))
    assert "does not exist" in error
    error = one_line_error(invoke("--store", '{"type": "NoSuchStore"}', "ls"))
    assert "unknown store type 'NoSuchStore'" in error
    debug = invoke("--debug", "--store", "{oops", "ls")
    assert debug.exit_code == 1
    assert isinstance(debug.exception, StoreUnavailableError)


def console_script() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "cachetool")
    if not os.path.exists(exe):
        pytest.skip("the cachetool console script is not installed in this environment")
    return exe


def test_console_script_ls_show_and_errors(built):
    exe = console_script()
    proc = subprocess.run([exe, "ls", "--json"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 5
    proc = subprocess.run([exe, "show", rows[0]["short"]], capture_output=True, text=True)
    assert proc.returncode == 0
    assert rows[0]["digest"] in proc.stdout
    proc = subprocess.run([exe, "show", "ffff0000"], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == "Error: no cache entry has a digest starting with 'ffff0000'\n"
    proc = subprocess.run([exe, "ls", "--sort", "bogus"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Invalid value for '--sort'" in proc.stderr
    proc = subprocess.run([exe, "purge", "--all"], capture_output=True, text=True, input="")
    assert proc.returncode == 1
    assert proc.stderr.rstrip().endswith("Aborted!")
    proc = subprocess.run(
        [exe, "--debug", "--store", "{oops", "ls"], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert len(json.loads(subprocess.check_output([exe, "ls", "--json"], text=True))) == 5


def test_explain_job_file_of_a_cached_job_uses_its_options(isolated_cache, tmp_path, counts):
    """@cached_job(cache_version=2, ignore=["verbose"]): the file's digest is the run's."""
    job = jobs.cached_scale(3, verbose=True)
    path = tmp_path / "job.json"
    dumpfn(job, path)
    store = JobStore(MemoryStore())
    run_locally(job, store=store, log=False)
    recorded = store.query_one({"uuid": job.uuid})["metadata"]["jobflow_cache"]["digest"]
    data = as_json("explain", "--job", str(path))
    assert data["job"]["digest"] == recorded
    assert data["job"]["cache_version"].endswith("2")
    assert "verbose" not in data["job"]["arg_digests"]
    assert "would be served from the cache" in data["summary"][0]
    assert counts() == {"cached_scale": 1}


def test_explain_job_file_of_a_script_function_is_one_clear_error(tmp_path):
    """A job whose function lives in a script (__main__) cannot be imported by cachetool."""
    script = tmp_path / "flow.py"
    script.write_text(
        "from jobflow import job\nfrom monty.serialization import dumpfn\n"
        "@job\ndef add(a, b):\n    return a + b\n"
        f"dumpfn(add(1, 2), {str(tmp_path / 'job.json')!r})\n"
    )
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path)
    result = invoke("explain", "--job", str(tmp_path / "job.json"))
    assert result.exit_code == 1
    assert "__main__:add" in result.stderr
    assert "defined in a script" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- issue 12: a first hour
# without friction. Every item runs under CliRunner and as the installed script (COLUMNS=80).


@dataclass
class EmtRelaxMaker(jobs.RelaxMaker):
    """A Maker that inherits ``make``: entries record this class, not RelaxMaker."""

    name: str = "emt relax"


def script(*args: str, env: dict[str, str] | None = None, **kwargs):
    return subprocess.run(
        [console_script(), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "80", **(env or {})},
        check=False,
        **kwargs,
    )


def test_a_fresh_home_read_only_commands_create_nothing(isolated_cache):
    for args in (["ls"], ["stats"], ["info"], ["verify"], ["gc", "--dry-run"], ["ls", "--json"]):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output)
        assert result.stderr.startswith(f"No cache at {isolated_cache / 'cache.sqlite'} yet"), args
        assert "Traceback" not in result.output
    assert json.loads(invoke("ls", "--json").stdout) == []
    assert json.loads(invoke("stats", "--json").stdout)["entries"] == 0
    assert "no cache entry" in invoke("show", "abcd").stderr
    proc = script("stats")
    assert proc.returncode == 0, proc.stderr
    assert "entries      0 (0 invalid)" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert not isolated_cache.exists(), "no command makes a store"


def test_stats_of_an_empty_existing_cache(isolated_cache):
    with CacheStore.from_settings():
        pass  # the embedded store, made and empty
    assert (isolated_cache / "cache.sqlite").exists()
    text = ok("stats").stdout
    assert "entries      0 (0 invalid)" in text
    assert "functions    0" in text
    proc = script("stats")
    assert (proc.returncode, proc.stderr) == (0, "")


def many_entries(n: int) -> None:
    with CacheStore.from_settings() as cache:
        for i in range(n):
            digest = f"{i:08x}" + "0" * 24
            cache.put(CacheEntry(digest=digest, scheme="jfc2", function="m:f", name=f"j{i}"))


def test_a_closed_pipe_ends_quietly(isolated_cache):
    many_entries(400)  # far more than a pipe buffer holds as JSON
    for command in ("ls --limit 0 | head -2", "ls --json --limit 0 | head -2"):
        proc = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {console_script()} {command}"],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "80"},
            check=False,
        )
        assert len(proc.stdout.splitlines()) == 2, command
        assert proc.stderr == "", (command, proc.stderr)  # no traceback, no "Exception ignored"
        assert proc.returncode in (0, 1, 141), proc.returncode


def test_tables_fit_80_and_120_columns(built):
    for width in (80, 120):
        proc = script("ls", env={"COLUMNS": str(width)})
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == 6
        assert max(len(line) for line in lines) <= width, (width, lines)
        assert lines[0].split()[-1] == "VALID", "every column is shown at 80 already"
        assert "\x1b[" not in proc.stdout, "no colour off a terminal"
    wide = script("ls", env={"COLUMNS": "120"}).stdout
    assert "tests.support.jobs:RelaxMaker.make" in wide
    narrow = script("ls", env={"COLUMNS": "80"}).stdout
    assert "tests.support.jobs:RelaxMaker.make" not in narrow, (
        "the long function is shortened at 80"
    )
    assert "\u2026" in narrow
    tiny = script("ls", env={"COLUMNS": "40"})
    assert max(len(line) for line in tiny.stdout.splitlines()) <= 40
    assert "left out to fit 40 columns; see --columns" in tiny.stderr
    assert "just now" in wide, "times are relative"
    created = [e["created"] for e in entries()]
    assert all(datetime.fromisoformat(c).tzinfo is not None for c in created), "JSON: absolute"


def test_columns_and_colour(built):
    result = ok("ls", "--columns", "digest,hits,valid")
    assert result.stdout.splitlines()[0].split() == ["DIGEST", "HITS", "VALID"]
    bad = invoke("ls", "--columns", "digest,bogus")
    assert bad.exit_code == 2
    assert "unknown column(s) bogus" in bad.stderr
    ok("invalidate", digest_of("add")[:8], "--reason", "wrong")
    coloured = script("ls", env={"FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"}).stdout
    invalid_line = next(line for line in coloured.splitlines() if "NO" in line)
    assert "\x1b[1;31mNO" in invalid_line, "invalid entries are red"
    plain = script("ls", env={"FORCE_COLOR": "1", "NO_COLOR": "1"}).stdout
    assert "\x1b[3" not in plain, "NO_COLOR: no colour"


def test_show_prints_indented_json_and_absolute_times(built):
    digest = digest_of("write_files")
    proc = script("show", digest[:8], env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    boxed = [line for line in proc.stdout.splitlines() if line[:1] in "\u256d\u2502\u2570"]
    assert boxed, "inputs, output and files are panels"
    assert max(len(line) for line in boxed) <= 80, "panels fit the terminal"
    created = as_json("show", digest[:8])["created"]
    assert created[:16].replace("T", " ") in ok("show", digest[:8]).stdout.replace("T", " ") or (
        "(just now)" in proc.stdout
    )
    assert "(just now)" in proc.stdout
    assert '"file":' in proc.stdout, "the output dict, one key a line"


def test_verify_fix_exits_0_when_everything_was_fixed(built, isolated_cache):
    with CacheStore.from_settings() as cache:
        doc = dict(next(cache.find({"name": "add"})))
        doc["output"] = "999"
        cache.backend.write([doc])
    assert script("verify").returncode == 1
    proc = script("verify", "--fix")
    assert proc.returncode == 0, proc.stdout
    assert "all fixed." in proc.stdout
    assert script("verify").returncode == 0


def test_settings_errors_are_one_line_naming_the_variable(isolated_cache, tmp_path, monkeypatch):
    error = one_line_error(CliRunner().invoke(cli, ["ls"], env={"JOBFLOW_CACHE_FILES": "hardlink"}))
    assert "JOBFLOW_CACHE_FILES='hardlink'" in error
    assert error.endswith("allowed values: 'link', 'copy' or 'none'")
    proc = script("ls", env={"JOBFLOW_CACHE_DEDUP": "maybe"})
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert "JOBFLOW_CACHE_DEDUP='maybe': expected a boolean (1/0, true/false" in proc.stderr
    config = tmp_path / "settings.yaml"
    config.write_text("FILES: hard\n")
    proc = script("stats", env={"JOBFLOW_CACHE_CONFIG_FILE": str(config)})
    assert proc.stderr == f"Error: bad jobflow-cache setting FILES: 'hard' in {config}: " + (
        "allowed values: 'link', 'copy' or 'none'\n"
    )
    config.write_text("FILES: [unclosed\n")
    proc = script("stats", env={"JOBFLOW_CACHE_CONFIG_FILE": str(config)})
    assert proc.stderr.startswith(f"Error: cannot parse jobflow-cache config file {config}")
    assert proc.stderr.count("\n") == 1
    missing = tmp_path / "nowhere.yaml"
    proc = script("ls", env={"JOBFLOW_CACHE_CONFIG_FILE": str(missing)})
    assert proc.returncode == 1
    assert f"JOBFLOW_CACHE_CONFIG_FILE names {missing}, which does not exist" in proc.stderr


def test_config_lists_every_setting_and_its_source(isolated_cache, tmp_path, monkeypatch):
    config = tmp_path / "settings.yaml"
    config.write_text("MAX_FILE_SIZE: 1000\n")
    monkeypatch.setenv("JOBFLOW_CACHE_CONFIG_FILE", str(config))
    monkeypatch.setenv("JOBFLOW_CACHE_DEDUP", "1")
    rows = {r["name"]: r for r in as_json("config")}
    assert rows["DEDUP"] == {
        "name": "DEDUP",
        "value": True,
        "source": "environment",
        "origin": "JOBFLOW_CACHE_DEDUP",
    }
    assert (rows["MAX_FILE_SIZE"]["value"], rows["MAX_FILE_SIZE"]["source"]) == (1000, "file")
    assert rows["MAX_FILE_SIZE"]["origin"] == str(config)
    assert rows["LEASE"]["source"] == "default"
    assert set(rows) == set(CacheSettings.model_fields)
    proc = script("config")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("DEDUP"))
    assert line.split() == ["DEDUP", "environment", "True"]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("FILES_EXCLUDE"))
    assert line.endswith('".jobflow-cache-*"]'), "values are whole"
    assert proc.stdout.startswith(f"Settings file: {config}\n")
    assert not isolated_cache.exists()


def test_store_forms_before_and_after_the_command(built, isolated_cache, tmp_path):
    path = str(isolated_cache / "cache.sqlite")
    settings_form = tmp_path / "settings.yaml"
    settings_form.write_text(f"STORE:\n  type: SQLiteStore\n  path: {path}\n")
    assert len(as_json("ls", "--store", str(settings_form))) == 5
    assert len(as_json("--store", str(settings_form), "ls")) == 5
    bare = json.dumps({"type": "SQLiteStore", "path": path})  # the embedded table by default
    assert as_json("stats", "--store", bare)["entries"] == 5
    proc = script("ls", "--store", bare, "--json")
    assert len(json.loads(proc.stdout)) == 5
    default_table = json.dumps({"type": "SQLiteStore", "path": path, "collection_name": "cache"})
    assert as_json("stats", "--store", default_table)["entries"] == 5  # 0.1.0's default table
    other = json.dumps({"type": "SQLiteStore", "path": path, "collection_name": "outputs"})
    error = one_line_error(invoke("ls", "--store", other))  # 0.1.0's store of another table
    assert "SQLiteStore was removed" in error
    assert '{"type": "SQLiteBackend", "path": ...}' in error
    other_file = tmp_path / "other.sqlite"
    sqlite3.connect(other_file).execute(
        "CREATE TABLE cache (key TEXT, doc TEXT)"
    ).connection.close()
    result = invoke("ls", "--store", json.dumps({"type": "SQLiteBackend", "path": str(other_file)}))
    assert result.exit_code == 0
    assert f"{other_file} has no table 'jfc_entries'" in result.stderr
    assert "cache (0 rows)" in result.stderr
    fresh = tmp_path / "fresh.sqlite"
    result = invoke("ls", "--store", json.dumps({"type": "SQLiteStore", "path": str(fresh)}))
    assert result.stderr.startswith(f"No cache at {fresh} yet")
    assert not fresh.exists()


def test_a_cache_in_sqlitestores_default_table_is_listed_not_called_missing(tmp_path):
    """A 0.1.0 file whose entries sit in SQLiteStore's default table ``cache`` (a spec that
    named no collection) is opened, migrated and listed; a foreign ``cache`` table is not."""
    old = tmp_path / "old.sqlite"
    shutil.copyfile(Path(__file__).resolve().parents[1] / "data" / "cache-v0.1.0.sqlite", old)
    with sqlite3.connect(old) as db:
        db.execute("ALTER TABLE entries RENAME TO cache")
        for table in ("jobflow_cache_collections", "jobflow_cache_array_paths"):
            db.execute(f"UPDATE {table} SET collection = 'cache' WHERE collection = 'entries'")
    spec = json.dumps({"type": "SQLiteStore", "path": str(old)})
    assert as_json("stats", "--store", spec)["entries"] == 7
    assert len(as_json("ls", "--store", spec, "--limit", "0")) == 7


def test_unreachable_servers_are_one_line(isolated_cache):
    error = one_line_error(invoke("ls", "--store", "mongodb://127.0.0.1:1/jfc"))
    assert error.startswith("Error: cannot reach MongoDB at 127.0.0.1:1 within 2 s: check")
    proc = script("--store", "postgresql://me@127.0.0.1:1/jfc", "stats")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("Error: cannot reach PostgreSQL at 127.0.0.1:1")
    assert "Topology" not in proc.stderr


def test_entries_record_the_makers_class_and_globs_match_it(isolated_cache, tmp_path, counts):
    run_locally(EmtRelaxMaker().make(1.0), log=False)
    run_locally(jobs.RelaxMaker().make(2.0), log=False)
    found = as_json("ls", "--function", "*EmtRelaxMaker*")
    assert [(e["name"], e["maker"]) for e in found] == [
        ("emt relax", "tests.cli.test_cli:EmtRelaxMaker")
    ]
    assert found[0]["function"] == "tests.support.jobs:RelaxMaker.make", "make is RelaxMaker's"
    assert [e["name"] for e in as_json("ls", "--name", "EmtRelaxMaker")] == ["emt relax"]
    assert len(as_json("ls", "--function", "tests.support.jobs:RelaxMaker.make")) == 2
    assert "MAKER" in script("ls", "--columns", "digest,maker").stdout


def _sigint_default() -> None:
    """In the child: Ctrl-C acts as in a terminal. pytest-xdist workers ignore SIGINT, and a
    child inherits an ignored signal, so Python would never raise KeyboardInterrupt in it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_interrupts_as_usual(isolated_cache, tmp_path):
    """A real SIGINT to a process running a flow: the summary so far is printed, the status
    is KeyboardInterrupt's, and the cache holds the finished jobs, sound."""
    flow_script = tmp_path / "flow.py"
    flow_script.write_text(
        "import time\nfrom pathlib import Path\nfrom jobflow import Flow, job\n"
        "from jobflow_cache import run_locally\n\n"
        "@job\ndef add(a, b):\n    return a + b\n\n"
        "@job\ndef slow(x):\n    Path('started').write_text('')\n    time.sleep(120)\n"
        "    return x\n\n"
        "a = add(1, 2)\nb = add(a.output, 3)\nc = slow(b.output)\n"
        "run_locally(Flow([a, b, c, add(c.output, 1)]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(flow_script)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_default,
    )
    started = tmp_path / "started"
    for _ in range(600):
        if started.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert started.exists(), proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, (proc.returncode, stderr)
    assert "Interrupted (KeyboardInterrupt) - 3 jobs: 0 served from cache, 3 executed" in stdout
    assert stderr.rstrip().endswith("KeyboardInterrupt")
    assert stderr.count('File "') <= 4, stderr  # the script, run_locally, Job.run, the job
    assert [e["name"] for e in entries()] == ["add", "add"], "finished jobs are cached"
    assert ok("verify").stdout == "Checked 2 entries: all sound.\n"


def chain_of_entries() -> dict[str, str]:
    """a <- b <- c (b consumed a's output, c b's), d alone, o of an old scheme."""
    digests = {name: name * 32 for name in "abcd"}
    digests["o"] = "0" * 32
    with CacheStore.from_settings() as cache:
        for name, up in [("a", ""), ("b", "a"), ("c", "b"), ("d", ""), ("o", "")]:
            cache.put(
                CacheEntry(
                    digest=digests[name],
                    scheme="jfc1" if name == "o" else SCHEME,
                    function="m:f",
                    name=name,
                    consumed=[digests[up]] if up else [],
                )
            )
    return digests


def validity() -> dict[str, bool]:
    return {e["name"]: e["valid"] for e in entries()}


def test_invalidate_asks_before_the_cascade(isolated_cache):
    chain_of_entries()
    refused = invoke("invalidate", "aaaa", input="n\n")
    assert refused.exit_code == 1
    assert "Invalidated too, because they consumed these (--no-cascade leaves them):" in (
        refused.stderr
    )
    assert "Invalidate 3 entries? [y/N]" in refused.stderr
    assert not [name for name, valid in validity().items() if not valid], "nothing changed"
    done = ok("invalidate", "aaaa", "--reason", "bad POTCAR", input="y\n")
    assert done.stdout.splitlines() == [
        "invalidated aaaaaaaa: bad POTCAR",
        "invalidated bbbbbbbb: bad POTCAR (consumed an invalidated entry)",
        "invalidated cccccccc: bad POTCAR (consumed an invalidated entry)",
    ]
    assert validity() == {"a": False, "b": False, "c": False, "d": True, "o": True}
    proc = script("invalidate", "dddd", "--no-cascade")
    assert proc.stdout == "invalidated dddddddd: invalidated with cachetool\n"


def test_purge_cascades_to_dependents_and_removes_outdated_schemes(isolated_cache):
    chain_of_entries()
    dry = ok("purge", "--digest", "bbbb", "--dry-run")
    assert "Removed too, because they consumed these" in dry.stdout
    assert "would remove 2 entries" in dry.stdout
    kept = as_json("purge", "--digest", "bbbb", "--no-cascade", "--yes")
    assert (kept["entries"], kept["cascaded"]) == (1, [])
    assert sorted(validity()) == ["a", "c", "d", "o"]
    gone = as_json("purge", "--digest", "aaaa", "--yes")
    assert (gone["entries"], gone["cascaded"]) == (1, [])  # c consumed b, which is gone
    outdated = script("purge", "--outdated", "--yes")
    assert outdated.returncode == 0, outdated.stderr
    assert "Removed 1 entry" in outdated.stdout
    assert sorted(validity()) == ["c", "d"]
    assert ok("purge", "--outdated", "--dry-run").stderr == "No entries match.\n"


def test_ctrl_c_in_cachetool_is_no_traceback(built):
    proc = subprocess.Popen(
        [console_script(), "purge", "--all"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_default,
    )
    for _ in range(300):  # wait for the question
        if proc.poll() is not None:
            break
        time.sleep(0.1)
        if len(entries()) == 5 and _waiting(proc):
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (1, 130), (proc.returncode, stderr)
    assert "Traceback" not in stderr
    assert len(entries()) == 5, "nothing removed"


def _waiting(proc: subprocess.Popen) -> bool:
    """True once the process sleeps (in the prompt's read), as far as /proc tells."""
    try:
        with open(f"/proc/{proc.pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].startswith("S")
    except OSError:
        return True
