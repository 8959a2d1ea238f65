"""Settings from the environment and from a YAML file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobflow_cache import CacheSettings, get_settings
from jobflow_cache.settings import cache_disabled, default_cache_dir


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
