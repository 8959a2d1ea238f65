"""Settings from the environment and from a YAML file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobflow_cache import CacheSettings, get_settings
from jobflow_cache.errors import SettingsError
from jobflow_cache.settings import cache_disabled, default_cache_dir, setting_sources


def test_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("JOBFLOW_CACHE_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("JOBFLOW_CACHE_FILES", "copy")
    monkeypatch.setenv("JOBFLOW_CACHE_STORE", json.dumps({"type": "MemoryStore"}))
    s = get_settings()
    assert tmp_path / "d" == s.DIR
    assert s.FILES == "copy"
    assert s.STORE == {"type": "MemoryStore"}
    assert s.store_path() == tmp_path / "d" / "cache.sqlite"
    assert s.objects_dir() == tmp_path / "d" / "objects"


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("true", True), ("0", False), ("", False)]
)
def test_disable_toggle(monkeypatch, value, expected):
    monkeypatch.setenv("JOBFLOW_CACHE_DISABLE", value)
    assert cache_disabled() is expected
    if value:
        assert get_settings().DISABLE is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("read_only", "read_only"),
        ("READ_ONLY", "read_only"),
        (" read-only ", "read_only"),
        ("Refresh", "refresh"),
        ("readwrite", "readwrite"),
    ],
)
def test_mode_is_read_as_people_write_it(monkeypatch, value, expected):
    monkeypatch.setenv("JOBFLOW_CACHE_MODE", value)
    mode = CacheSettings().MODE
    assert mode == expected
    monkeypatch.setenv("JOBFLOW_CACHE_MODE", "readonly")  # not a spelling: still refused
    with pytest.raises(SettingsError, match="JOBFLOW_CACHE_MODE='readonly'"):
        CacheSettings()


def test_settings_are_rebuilt_when_the_environment_changes(monkeypatch, tmp_path):
    monkeypatch.setenv("JOBFLOW_CACHE_DIR", str(tmp_path / "one"))
    first = get_settings()
    assert get_settings() is first, "cached while nothing changes"
    monkeypatch.setenv("JOBFLOW_CACHE_DIR", str(tmp_path / "two"))
    assert tmp_path / "two" == get_settings().DIR


def test_yaml_file_under_environment(monkeypatch, tmp_path, isolated_cache):
    config = tmp_path / "c.yaml"
    config.write_text("FILES: none\nmax_file_size: 1000\nDIR: /from/yaml\n")
    monkeypatch.setenv("JOBFLOW_CACHE_CONFIG_FILE", str(config))
    s = CacheSettings()
    assert s.FILES == "none"
    assert s.MAX_FILE_SIZE == 1000
    assert isolated_cache == s.DIR, "the environment wins over the file"
    monkeypatch.delenv("JOBFLOW_CACHE_DIR")
    assert Path("/from/yaml") == CacheSettings().DIR


def test_bad_yaml_is_a_clear_error(monkeypatch, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("FILES: [unclosed\n")
    monkeypatch.setenv("JOBFLOW_CACHE_CONFIG_FILE", str(config))
    with pytest.raises(ValueError, match="cannot parse"):
        CacheSettings()


def test_default_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "jobflow-cache"


def test_a_named_settings_file_that_is_missing_is_an_error(monkeypatch, tmp_path):
    missing = tmp_path / "missing.yaml"
    monkeypatch.setenv("JOBFLOW_CACHE_CONFIG_FILE", str(missing))
    with pytest.raises(SettingsError, match=f"JOBFLOW_CACHE_CONFIG_FILE names {missing}, which"):
        CacheSettings()
    monkeypatch.setenv("JOBFLOW_CACHE_CONFIG_FILE", os.devnull)  # "no settings file"
    assert CacheSettings().FILES in ("link", "copy", "none")


def test_the_default_settings_file_may_be_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("JOBFLOW_CACHE_CONFIG_FILE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not (tmp_path / ".jobflow-cache.yaml").exists()
    assert CacheSettings().MAX_FILE_SIZE == 0


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FILES", "hardlink", "allowed values: 'link', 'copy' or 'none'"),
        ("DEDUP", "maybe", "expected a boolean (1/0, true/false, yes/no, on/off)"),
        ("MAX_FILE_SIZE", "big", "expected a whole number"),
        ("LEASE", "-1", "Input should be greater than 0"),
    ],
)
def test_bad_values_are_one_line_naming_the_variable(monkeypatch, variable, value, expected):
    monkeypatch.setenv(f"JOBFLOW_CACHE_{variable}", value)
    with pytest.raises(SettingsError) as err:
        get_settings()
    assert str(err.value) == (
        f"bad jobflow-cache setting JOBFLOW_CACHE_{variable}={value!r}: {expected}"
    )
    assert "\n" not in str(err.value)


def test_bad_file_keys_name_the_key_and_the_file(monkeypatch, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("dedup: maybe\n")
    monkeypatch.setenv("JOBFLOW_CACHE_CONFIG_FILE", str(config))
    with pytest.raises(SettingsError) as err:
        CacheSettings()
    assert str(err.value) == (
        f"bad jobflow-cache setting DEDUP: 'maybe' in {config}: "
        "expected a boolean (1/0, true/false, yes/no, on/off)"
    )
    config.write_text("- a list\n")
    with pytest.raises(SettingsError, match="must hold a mapping"):
        CacheSettings()


def test_setting_sources_say_where_each_value_came_from(monkeypatch, tmp_path, isolated_cache):
    config = tmp_path / "c.yaml"
    config.write_text("FILES: none\nLEASE: 5\n")
    monkeypatch.setenv("JOBFLOW_CACHE_CONFIG_FILE", str(config))
    monkeypatch.setenv("JOBFLOW_CACHE_LEASE", "7")
    rows = {row.name: row for row in setting_sources()}
    assert set(rows) == set(CacheSettings.model_fields)
    assert rows["LEASE"] == ("LEASE", 7.0, "environment", "JOBFLOW_CACHE_LEASE")
    assert rows["FILES"] == ("FILES", "none", "file", str(config))
    assert rows["DIR"] == ("DIR", isolated_cache, "environment", "JOBFLOW_CACHE_DIR")
    assert rows["DEDUP"] == ("DEDUP", False, "default", "")


# -- a bad setting never fails a workflow: one warning, every job runs uncached ------------------

#: Runs in a fresh process (the environment holds the bad setting): a worker's ``job.run`` of
#: one ``@cached_job`` (as FireWorks and jobflow-remote run it), then a flow of two plain jobs
#: under jobflow_cache.run_locally, then a flow of two @cached_job jobs under jobflow's own
#: run_locally; prints the outputs and the CacheWarnings of each, as JSON.
CHILD = """
import json, sys, warnings
from jobflow import Flow, JobStore, run_locally as jobflow_run_locally
from maggma.stores import MemoryStore
from jobflow_cache import CacheWarning, run_locally
from tests.support import jobs

def caught(run):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        outputs = run()
    return {"outputs": outputs, "warnings": [
        str(w.message) for w in seen if issubclass(w.category, CacheWarning)]}

def worker():
    store = JobStore(MemoryStore())
    store.connect()
    job = jobs.cached_add(1, 2)
    job.run(store)
    return [store.get_output(job.uuid)]

def ours():
    flow = Flow([jobs.add(1, 2), jobs.mul(3, 4)])
    out = run_locally(flow, store=JobStore(MemoryStore()), log=False, ensure_success=True)
    return [out[j.uuid][1].output for j in flow]

def theirs():
    flow = Flow([jobs.cached_add(2, 3), jobs.cached_add(4, 5)])
    out = jobflow_run_locally(flow, store=JobStore(MemoryStore()), log=False,
                              ensure_success=True)
    return [out[j.uuid][1].output for j in flow]

print(json.dumps({"worker": caught(worker), "ours": caught(ours), "theirs": caught(theirs)}))
"""

BAD_SETTINGS = [
    ("STORE", "[1,2]", "expected a store spec"),
    ("STORE", "5", "expected a store spec"),
    ("STORE", "true", "expected a store spec"),
    ("LEASE", "abc", "expected a number"),
    ("DEDUP", "maybe", "expected a boolean (1/0, true/false, yes/no, on/off)"),
    ("FILES", "bogus", "allowed values: 'link', 'copy' or 'none'"),
    ("MODE", "bogus", "allowed values: 'readwrite', 'read_only' or 'refresh'"),
    ("MAX_DECODED_SIZE", "-1", "greater than 0"),
    ("FILES_EXCLUDE", "abc", "not valid JSON"),
    ("BLOB_THRESHOLD", "1e", "expected a whole number"),
]


def _run_child(tmp_path: Path, env: dict[str, str]) -> dict:
    root = Path(__file__).resolve().parents[1]
    counts = tmp_path / "executions.txt"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        env={**os.environ, "PYTHONPATH": str(root), "JFC_COUNTS_FILE": str(counts), **env},
        cwd=tmp_path / "cwd",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["executions"] = sorted(counts.read_text().split()) if counts.exists() else []
    return result


def _assert_uncached_with_one_warning(result: dict, *needles: str) -> None:
    assert result["worker"]["outputs"] == [3]
    assert result["ours"]["outputs"] == [3, 12]
    assert result["theirs"]["outputs"] == [5, 9]
    # every job really ran (nothing served, nothing half-cached)
    assert result["executions"] == ["add", "cached_add", "cached_add", "cached_add", "mul"]
    for manager in ("worker", "ours"):
        (message,) = result[manager]["warnings"]  # one warning, however many jobs
        assert "jobs run uncached" in message
        for needle in needles:
            assert needle in message, message
    # jobflow's manager shares the process's default cache with the worker above: it was
    # warned about once in this process
    assert len(result["theirs"]["warnings"]) <= 1


@pytest.mark.slow  # a fresh process each (about 4 s)
@pytest.mark.parametrize(("variable", "value", "allowed"), BAD_SETTINGS)
def test_a_bad_setting_runs_every_manager_uncached_with_one_warning(
    variable, value, allowed, tmp_path
):
    """A bad value of any setting, in a fresh process: the worker's job, our run_locally and
    jobflow's run_locally all succeed with the outputs of plain jobflow, every job runs, and
    the warning names the variable, the value and what is allowed; cachetool fails with one
    line."""
    result = _run_child(tmp_path, {f"JOBFLOW_CACHE_{variable}": value})
    _assert_uncached_with_one_warning(result, f"JOBFLOW_CACHE_{variable}={value!r}", allowed)


def test_a_bad_setting_fails_cachetool_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("JOBFLOW_CACHE_STORE", "[1,2]")
    proc = subprocess.run(
        [sys.executable, "-c", "from jobflow_cache.cli import main; main()", "stats"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "JOBFLOW_CACHE_STORE='[1,2]': expected a store spec" in line
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a fresh process each (about 4 s)
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("FILES: [unclosed\n", "cannot parse jobflow-cache config file"),
        ("- a list\n", "must hold a mapping"),
        ("lease: abc\n", "LEASE: 'abc' in"),
    ],
)
def test_a_bad_settings_file_runs_every_manager_uncached_with_one_warning(text, needle, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = _run_child(tmp_path, {"JOBFLOW_CACHE_CONFIG_FILE": str(config)})
    _assert_uncached_with_one_warning(result, needle)


def test_a_missing_group_key_file_runs_every_manager_uncached_with_one_warning(tmp_path):
    """A cache told to check signatures never serves without checking them: with the key
    file missing it is skipped (one warning naming the file), never used unsigned."""
    missing = tmp_path / "no-such-key"
    result = _run_child(tmp_path, {"JOBFLOW_CACHE_GROUP_KEY_FILE": str(missing)})
    _assert_uncached_with_one_warning(result, str(missing))
