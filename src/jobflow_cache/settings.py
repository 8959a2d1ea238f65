"""Settings, read from ``JOBFLOW_CACHE_*`` environment variables and an optional YAML file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_CONFIG_FILE", "CacheSettings", "default_cache_dir", "get_settings"]

logger = logging.getLogger(__name__)

ENV_PREFIX = "JOBFLOW_CACHE_"
DEFAULT_CONFIG_FILE = "~/.jobflow-cache.yaml"

#: Files that managers write into run folders for their own bookkeeping; never cached.
DEFAULT_FILES_EXCLUDE = [
    "FW.json",
    "FW_offline.json",
    "FW_ping.json",
    "jfremote_*",
    # batch-script files that FireWorks' qlaunch and jobflow-remote put in the run folder
    "FW_submit.script",
    "FW_job*.out",
    "FW_job*.error",
    "submit.sh",
    "queue.out",
    "queue.err",
    "*.lock",
    ".jobflow-cache-*",
]


def default_cache_dir() -> Path:
    """Per-user cache folder: ``$XDG_CACHE_HOME/jobflow-cache`` or ``~/.cache/jobflow-cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jobflow-cache"


class CacheSettings(BaseSettings):
    """Settings of jobflow-cache.

    Every field can be set by an environment variable ``JOBFLOW_CACHE_<FIELD>`` or in a YAML
    file (``JOBFLOW_CACHE_CONFIG_FILE``, default ``~/.jobflow-cache.yaml``); the environment wins.

    Examples
    --------
    >>> s = CacheSettings(DIR="/tmp/my-cache")
    >>> s.store_path().name
    'cache.sqlite'
    """

    CONFIG_FILE: str = Field(DEFAULT_CONFIG_FILE, description="YAML file with settings.")
    DISABLE: bool = Field(
        False, description="Turn all hashing and cache use off; behave exactly like jobflow."
    )
    DIR: Path = Field(
        default_factory=default_cache_dir,
        description="Folder of the embedded default store (cache.sqlite) and of file objects.",
    )
    STORE: dict[str, Any] | str | None = Field(
        None,
        description="A maggma store spec used instead of the embedded default, in the same forms "
        "as jobflow's JOB_STORE: a serialized store ({'@module', '@class', ...}), "
        "{'type': 'MongoStore', 'database': ..., 'collection_name': ...}, or the path of a "
        "YAML/JSON file holding either.",
    )
    BLOB_STORE: dict[str, Any] | str | None = Field(
        None,
        description="A maggma store spec (same forms as STORE) for outputs too large for one "
        "entry document (see BLOB_THRESHOLD). Default: a GridFSStore '<collection>_blobs' in "
        "the database of a MongoStore STORE; none for other stores (nothing is moved).",
    )
    BLOB_THRESHOLD: int = Field(
        8 * 1024 * 1024,
        description="Entry documents larger than this many bytes (output and response already "
        "compressed) keep output and response in the blob store, if there is one. MongoDB "
        "refuses documents over 16 MiB.",
    )
    OBJECTS_DIR: Path | None = Field(
        None, description="Folder of the content-addressed file objects (default DIR/objects)."
    )
    FILES: Literal["link", "copy", "none"] = Field(
        "link",
        description="How run-folder files are recorded and put back on a hit: hard 'link' "
        "(falls back to copy across file systems), 'copy', or 'none' (files not cached).",
    )
    FILES_EXCLUDE: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FILES_EXCLUDE),
        description="Glob patterns of run-folder files never recorded. A value replaces the "
        "defaults (managers' bookkeeping and batch-script files): repeat those you keep.",
    )
    MAX_FILE_SIZE: int = Field(
        0, description="Files larger than this many bytes are not cached (0: no limit)."
    )
    MAX_CANONICAL_INPUT: int = Field(
        65_536,
        description="Largest canonical input (bytes) kept in an entry for `explain`; larger "
        "inputs keep only their per-argument digests.",
    )
    TRUSTED_MODULES: list[str] = Field(
        default_factory=list,
        description="Modules (with their submodules) whose classes and functions a cached value "
        "may name without the checks of a shared store's documents: importing a module not "
        "imported yet that is no installed package, or a function that is no jobflow job. "
        "'*' trusts every module (monty's decoder unchecked).",
    )
    DEDUP: bool = Field(
        False,
        description="In-flight deduplication: a worker that reaches a digest another worker is "
        "computing waits for that result instead of computing it too (a claim with a lease in "
        "the store; SQLite, PostgreSQL and MongoDB stores).",
    )
    LEASE: float = Field(
        60.0,
        gt=0,
        description="Seconds a claim lasts unless its worker renews it (it does, every quarter "
        "lease, while the job runs): how long others wait for a worker that died.",
    )
    EXCLUSIVE_DIRS: bool = Field(
        False,
        description="Every job runs in a run folder of its own whose path no other job reuses "
        "(FireWorks, jobflow-remote). Run folders are then recorded in the store, so a worker in "
        "a fresh process recognises an upstream job's folder among a job's inputs (prev_dir).",
    )

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _load_config_file(cls, values: Any) -> Any:
        """Use the YAML file's values as defaults under explicit values and the environment."""
        if not isinstance(values, dict):
            return values
        path = values.get("CONFIG_FILE") or os.environ.get(
            f"{ENV_PREFIX}CONFIG_FILE", DEFAULT_CONFIG_FILE
        )
        file = Path(str(path)).expanduser()
        if not file.is_file() or file.stat().st_size == 0:
            return values
        import yaml

        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"cannot parse jobflow-cache config file {file}: {err}") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"jobflow-cache config file {file} must hold a mapping")
        return {**{k.upper(): v for k, v in loaded.items()}, **values}

    def store_path(self) -> Path:
        """Path of the embedded default store's SQLite file."""
        return Path(self.DIR).expanduser() / "cache.sqlite"

    def objects_dir(self) -> Path:
        """Folder of the content-addressed file objects."""
        return Path(self.OBJECTS_DIR or Path(self.DIR) / "objects").expanduser()


_cached: tuple[tuple[tuple[str, str], ...], CacheSettings] | None = None


def get_settings() -> CacheSettings:
    """Current settings, rebuilt only when a ``JOBFLOW_CACHE_*`` variable has changed.

    Examples
    --------
    >>> isinstance(get_settings().DISABLE, bool)
    True
    """
    global _cached
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX)))
    env += (("XDG_CACHE_HOME", os.environ.get("XDG_CACHE_HOME", "")),)
    if _cached is None or _cached[0] != env:
        _cached = (env, CacheSettings())
    return _cached[1]


def cache_disabled() -> bool:
    """True when ``JOBFLOW_CACHE_DISABLE`` is set to a true value (read on every call)."""
    return os.environ.get(f"{ENV_PREFIX}DISABLE", "").strip().lower() in {"1", "true", "yes", "on"}
