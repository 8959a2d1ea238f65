"""cachetool through click's CliRunner and as the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from jobflow_cache import __version__, run_locally
from jobflow_cache.cli import cli
from tests import jobs


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


def test_unreachable_store_is_one_line_exit_1(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("JOBFLOW_CACHE_DIR", str(blocker / "sub"))
    exe = shutil.which("cachetool") or os.path.join(os.path.dirname(os.sys.executable), "cachetool")
    if not os.path.exists(exe):
        pytest.skip("the cachetool console script is not installed in this environment")
    proc = subprocess.run([exe, "info"], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: ")
    assert "Traceback" not in proc.stderr
