"""Settings from the environment and from a YAML file."""

from __future__ import annotations

import json
import os
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
