"""Settings, read from ``JOBFLOW_CACHE_*`` environment variables and an optional YAML file."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import (
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from jobflow_cache.errors import SettingsError

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "CacheSettings",
    "SettingSource",
    "default_cache_dir",
    "get_settings",
    "read_config_file",
    "setting_sources",
]

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
    SERVED_DIR: Path | None = Field(
        None,
        description="Folder where Plan.apply places the run folders of jobs it serves ahead of "
        "submission, one per job (default: 'served' beside the object area). Put it on the "
        "file system the workers share.",
    )
    FILES: Literal["link", "copy", "none"] = Field(
        "copy",
        description="How run-folder files are kept and put back on a hit: 'copy' (independent "
        "copies, reflinks where the file system has them), 'link' (the same, but with "
        "run_locally(create_folders=True) files of 64 MiB and more are served as read-only "
        "hard links, never as root), or 'none' (files are not stored, only their digests: a "
        "hit copies them from the recording run's folder while they are unchanged there, "
        "else the job runs). Recording never changes the user's files.",
    )
    FILES_EXCLUDE: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FILES_EXCLUDE),
        description="Glob patterns of run-folder files never recorded. A value replaces the "
        "defaults (managers' bookkeeping and batch-script files): repeat those you keep.",
    )
    MAX_FILE_SIZE: int = Field(
        0,
        description="Files larger than this many bytes are not stored, only their digests: a "
        "hit copies them from the recording run's folder while they are unchanged there, else "
        "the job runs (0: no limit).",
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
    DIGEST_ENV: list[str] | str = Field(
        default_factory=list,
        description="Names of environment variables whose values enter every job's digest "
        "(a comma-separated list, e.g. OMP_NUM_THREADS,MY_CODE_MODE); a job adds its own with "
        "@cached_job(env=[...]) or metadata['jobflow_cache']['env']. An unset variable differs "
        "from an empty one.",
    )

    MODE: Literal["readwrite", "read_only", "refresh"] = Field(
        "readwrite",
        description="How jobs use the cache: 'readwrite' (serve hits, record misses), "
        "'read_only' (serve hits, never write: for consumers of a group's cache) or 'refresh' "
        "(never serve: recompute and replace the entries). A job's own option wins.",
    )
    GROUP_KEY: SecretStr | None = Field(
        None,
        description="Secret key of a group sharing a store (at least 16 bytes): entries are "
        "signed (HMAC-SHA256 over their digest and checksum) and unsigned, altered, moved or "
        "otherwise signed entries are never served. Unset: signatures are neither written nor "
        "checked. Prefer GROUP_KEY_FILE (a key in the environment is visible to other "
        "processes); GROUP_KEY wins when both are set. A key that cannot be read: the flow "
        "runs uncached, with a warning.",
    )
    GROUP_KEY_FILE: Path | None = Field(
        None,
        description="File holding the group key (its content, surrounding whitespace "
        "stripped; readable by the group only).",
    )
    MAX_DECODED_SIZE: int = Field(
        1 << 30,
        gt=0,
        description="Largest output and response of an entry, together (bytes, after "
        "decompression) a lookup decodes; larger ones are invalid entries, never decoded. "
        "Compressed fields are measured a chunk at a time before they are inflated.",
    )
    SERVE_CODE_FILES: bool = Field(
        False,
        description="Record and serve run-folder files Python would import (*.py, *.pyc, "
        "*.pth, *.so, sitecustomize, usercustomize), hidden files (.bashrc, .git/...) and "
        "symlinks out of the run folder, when the job created them. Off: a job that wrote "
        "such paths is not recorded (it runs every time) and a hit whose manifest holds them "
        "is refused, so a store can never place code in a run folder.",
    )
    VERIFY_FILES_LIMIT: int = Field(
        1 << 30,
        ge=0,
        description="File objects up to this many bytes are verified by content (xxh3) before "
        "a hit serves them, memoised per object on device, inode, size, mtime and ctime; "
        "larger ones by that memo or their seal (size and mtime nanoseconds) only, re-hashed "
        "when it is broken (0: verify every object by content).",
    )
    GC_GRACE: float = Field(
        3600.0,
        ge=0,
        description="Seconds during which a file object stored (or re-stored) is never "
        "deleted by gc or purge, referenced or not; objects of entries being recorded are "
        "kept regardless (pinned by their process).",
    )

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    def __init__(self, **values: Any) -> None:
        """Validate; a bad value is one :class:`.SettingsError` line naming its source."""
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise SettingsError(_describe(err, values)) from None
        except PydanticSettingsError as err:  # a value the environment source cannot parse
            raise SettingsError(_describe_source_error(err)) from None

    @model_validator(mode="before")
    @classmethod
    def _load_config_file(cls, values: Any) -> Any:
        """Use the YAML file's values as defaults under explicit values and the environment."""
        if not isinstance(values, dict):
            return values
        loaded = read_config_file(values.get("CONFIG_FILE"))
        return {**loaded, **values}

    @field_validator("MODE", mode="before")
    @classmethod
    def _mode_spelling(cls, value: Any) -> Any:
        """``READ_ONLY``, ``read-only`` and ``Read_Only`` are ``read_only`` (the value of an
        environment variable is often written so); anything else is left to the check."""
        if isinstance(value, str):
            return value.strip().lower().replace("-", "_")
        return value

    @model_validator(mode="after")
    def _absolute_paths(self) -> CacheSettings:
        """Relative ``DIR`` and ``OBJECTS_DIR`` are made absolute once, when the settings are
        made: against the working folder (where ``run_locally`` or ``cachetool`` starts), or
        against the folder the process started in when that happens inside a running job (a
        ``@cached_job`` under jobflow's own manager, whose run folder may be the job's own):
        never against a job's run folder, which would give every job a cache of its own."""
        base = _resolution_base()
        self.DIR = _absolute(self.DIR, base)
        if self.OBJECTS_DIR is not None:
            self.OBJECTS_DIR = _absolute(self.OBJECTS_DIR, base)
        if self.SERVED_DIR is not None:
            self.SERVED_DIR = _absolute(self.SERVED_DIR, base)
        return self

    def store_path(self) -> Path:
        """Path of the embedded default store's SQLite file."""
        return Path(self.DIR).expanduser() / "cache.sqlite"

    def objects_dir(self) -> Path:
        """Folder of the content-addressed file objects."""
        return Path(self.OBJECTS_DIR or Path(self.DIR) / "objects").expanduser()


#: The working folder when jobflow_cache was imported (where the script or worker started).
_START_DIR = os.getcwd()


def _resolution_base() -> str:
    """Folder relative cache paths are resolved against (see ``CacheSettings``)."""
    try:
        from jobflow import CURRENT_JOB

        in_job = CURRENT_JOB.job is not None
    except Exception:  # jobflow not importable here: no job is running
        in_job = False
    try:
        return _START_DIR if in_job else os.getcwd()
    except OSError:  # the working folder was removed
        return _START_DIR


def _absolute(path: Path, base: str) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(os.path.join(base, path)))


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
    """True when ``DISABLE`` is set: ``JOBFLOW_CACHE_DISABLE`` to a true value, or, when that
    variable is unset or empty, ``DISABLE: true`` in the settings file (the environment wins,
    as for every setting). The variable is read on every call, the file too except inside a
    ``run_locally`` run, which reads it once when it starts (:func:`file_read_once`); settings
    that cannot be read count as not disabled (the cache then warns once and runs every job
    uncached)."""
    value = os.environ.get(f"{ENV_PREFIX}DISABLE", "").strip().lower()
    if value:
        return value in {"1", "true", "yes", "on"}
    fixed = _RUN_FILE_DISABLES.get()
    if fixed is not None:
        return fixed
    return _file_disables()


#: The settings file's DISABLE as the running ``run_locally`` read it when it started (None:
#: no run): a stat of the file for each job costs about as much as the rest of the check.
_RUN_FILE_DISABLES: ContextVar[bool | None] = ContextVar("_RUN_FILE_DISABLES", default=None)


@contextmanager
def file_read_once() -> Iterator[None]:
    """Inside the block, :func:`cache_disabled` takes the settings file's ``DISABLE`` as it
    was when the block began (``JOBFLOW_CACHE_DISABLE`` is still read on every call)."""
    token = _RUN_FILE_DISABLES.set(_file_disables())
    try:
        yield
    finally:
        _RUN_FILE_DISABLES.reset(token)


#: (settings file, its stat) -> its DISABLE, for :func:`cache_disabled` (called for every job:
#: a stat instead of reading the file or building the settings, ~45 us).
_file_disable: tuple[tuple[Any, ...], bool] | None = None


def _file_disables() -> bool:
    global _file_disable
    file = os.environ.get(f"{ENV_PREFIX}CONFIG_FILE") or DEFAULT_CONFIG_FILE
    try:
        st = os.stat(os.path.expanduser(file))
    except (OSError, ValueError):
        return False
    key = (file, st.st_ino, st.st_size, st.st_mtime_ns)
    if _file_disable is not None and _file_disable[0] == key:
        return _file_disable[1]
    try:
        disabled = TypeAdapter(bool).validate_python(
            read_config_file().get("DISABLE", False) or False
        )
    except Exception:  # a bad settings file: said by the cache (and cachetool), not here
        disabled = False
    _file_disable = (key, disabled)
    return disabled


# -- where each setting comes from, and errors that say it ----------------------------------------
def config_file(explicit: Any = None) -> tuple[Path, bool]:
    """The settings file, and whether it was named (``CONFIG_FILE`` given or in the environment)
    rather than the default ``~/.jobflow-cache.yaml``."""
    named = explicit or os.environ.get(f"{ENV_PREFIX}CONFIG_FILE")
    return Path(str(named or DEFAULT_CONFIG_FILE)).expanduser(), bool(named)


def read_config_file(explicit: Any = None) -> dict[str, Any]:
    """The settings of the YAML file (keys upper-cased); ``{}`` when the default file does not
    exist or is ``os.devnull``. A named file that does not exist, cannot be parsed or holds no
    mapping is a :class:`.SettingsError`."""
    file, named = config_file(explicit)
    if str(file) == os.devnull:  # "no settings file"
        return {}
    if not file.is_file():
        if named:
            raise SettingsError(
                f"{ENV_PREFIX}CONFIG_FILE names {file}, which does not exist "
                f"(unset it to use {DEFAULT_CONFIG_FILE} if present)"
            )
        return {}
    if file.stat().st_size == 0:
        return {}
    import yaml

    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SettingsError(
            f"cannot parse jobflow-cache config file {file}{line}: {problem}"
        ) from None
    if not isinstance(loaded, dict):
        raise SettingsError(f"jobflow-cache config file {file} must hold a mapping (KEY: value)")
    return {str(k).upper(): v for k, v in loaded.items()}


def _environment() -> dict[str, str]:
    """``JOBFLOW_CACHE_*`` variables by field name (pydantic-settings ignores their case)."""
    return {
        k[len(ENV_PREFIX) :].upper(): v
        for k, v in os.environ.items()
        if k.upper().startswith(ENV_PREFIX)
    }


_ALLOWED = {
    "bool_parsing": "expected a boolean (1/0, true/false, yes/no, on/off)",
    "bool_type": "expected a boolean (1/0, true/false, yes/no, on/off)",
    "int_parsing": "expected a whole number",
    "int_type": "expected a whole number",
    "float_parsing": "expected a number",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
}


def _where(field: str, values: dict[str, Any]) -> str:
    """Where a field's value came from: ``JOBFLOW_CACHE_FILES='x'`` or ``FILES in <file>``."""
    env = _environment()
    if field in values:
        return f"{field}={values[field]!r}"
    if field in env:
        return f"{ENV_PREFIX}{field}={env[field]!r}"
    file, _ = config_file(values.get("CONFIG_FILE"))
    try:
        in_file = read_config_file(values.get("CONFIG_FILE"))
    except SettingsError:
        in_file = {}
    if field in in_file:
        return f"{field}: {in_file[field]!r} in {file}"
    return field


#: What a field whose type is a union allows (pydantic reports one problem per member).
_SPEC = (
    "expected a store spec: a mapping (JSON in the variable, e.g. "
    '{"type": "MongoStore", "database": ..., "collection_name": ...}) or the path of a '
    "YAML/JSON file holding one"
)
_UNION_ALLOWED = {
    "STORE": _SPEC,
    "BLOB_STORE": _SPEC,
    "DIGEST_ENV": "expected a list of variable names or one comma-separated string",
    "GROUP_KEY_FILE": "expected the path of a file holding the group key",
}


def _describe(err: ValidationError, values: dict[str, Any]) -> str:
    """One line for every field with a problem in a validation error."""
    parts = []
    described: set[str] = set()
    for problem in err.errors(include_url=False):
        ctx = problem.get("ctx") or {}
        cause = ctx.get("error")
        if isinstance(cause, SettingsError):  # raised by the config-file validator
            parts.append(str(cause))
            continue
        loc = problem.get("loc") or ()
        field = str(loc[0]) if loc else ""
        if field and field in described:  # one part per field, not one per union member
            continue
        described.add(field)
        kind = problem.get("type", "")
        if field in _UNION_ALLOWED:
            allowed = _UNION_ALLOWED[field]
        elif kind == "literal_error":
            allowed = f"allowed values: {ctx.get('expected')}"
        elif kind in _ALLOWED:
            allowed = _ALLOWED[kind]
        else:
            allowed = str(problem.get("msg", "invalid value")).removeprefix("Value error, ")
        where = _where(field, values) if field else "settings"
        parts.append(f"bad jobflow-cache setting {where}: {allowed}")
    return "; ".join(parts) or "bad jobflow-cache settings"


def _describe_source_error(err: Exception) -> str:
    text = str(err)
    import re

    found = re.search(r'field "(\w+)"', text)
    if found:
        field = found.group(1).upper()
        value = _environment().get(field)
        shown = f"={value!r}" if value is not None else ""
        return f"bad jobflow-cache setting {ENV_PREFIX}{field}{shown}: not valid JSON"
    return f"bad jobflow-cache settings: {text.splitlines()[0] if text else type(err).__name__}"


class SettingSource(NamedTuple):
    """One effective setting: its name, value, and where the value came from."""

    name: str
    value: Any
    source: str  # "environment", "file" or "default"
    origin: str  # the environment variable, the file, or "" for a default


def setting_sources(settings: CacheSettings | None = None) -> list[SettingSource]:
    """Every setting with its effective value and where it came from (environment first, then
    the settings file, then the default), like ``verdi config list``."""
    settings = settings or get_settings()
    env = _environment()
    file, _ = config_file()
    in_file = read_config_file()
    rows = []
    for name in CacheSettings.model_fields:
        value = getattr(settings, name)
        if name in env:
            source, origin = "environment", f"{ENV_PREFIX}{name}"
        elif name in in_file:
            source, origin = "file", str(file)
        else:
            source, origin = "default", ""
        rows.append(SettingSource(name, value, source, origin))
    return rows
