"""Which code is the user's, and the digest of the user code a job runs.

What counts as user code
------------------------
Code is **user code** unless its file lies inside an installed distribution or the standard
library. Concretely, a module is *installed* when its file (symlinks resolved) is under one of

* the standard library and site folders of ``sysconfig`` (``stdlib``, ``platstdlib``,
  ``purelib``, ``platlib``) and of :mod:`site` (``getsitepackages``, the user site), or
* any ``sys.path`` entry named ``site-packages`` or ``dist-packages`` (virtual environments,
  Debian's system packages, folders added with :func:`site.addsitedir`).

Everything else is user code: the script (``__main__``, also without a file, as with
``python -c`` or a notebook), modules beside it, modules found through other ``sys.path`` entries
(a project's ``src/`` or ``tests/`` folder, ``PYTHONPATH``) and **editable installs**, whose
files stay in their source tree (a PEP 660 finder, a ``.pth`` file naming the tree, or
``direct_url.json`` with ``"editable": true``, see :func:`editable_distributions`). Modules with
no file (built-in, frozen) are installed. jobflow-cache itself is never user code (it is the
tool, not the job). The answer is memoised per module.

What the code digest covers
---------------------------
For a job function of user code: its own source, and transitively the user-code functions,
classes and module-level constants it references. The references are found in the compiled
code: the global and attribute names of the function's code and of every code object nested in
it (comprehensions, inner functions, lambdas), resolved against the function's globals, and
attribute chains through user modules (``helpers.scale``); closure cells; default arguments;
``__wrapped__``. A user class counts with its source, the references of its methods and every
user-code class of its MRO. A module-level constant of user code counts by value
(:func:`.canonical.digest_value`); a referenced global whose value cannot be hashed
counts as a marker with its name and type (and warns once), so it never fails a job. The rest of
a file does not count: an edit elsewhere in the script leaves the digest as it was.

Sources are compared as token streams without comments, blank lines and indentation widths, so
an edit of a comment or of whitespace between tokens changes nothing. Code whose source cannot be
read (``python -c``, ``exec``) counts by its compiled form (bytecode, names, constants, nested
code), which also ignores comments but changes with the Python version: reading a source needs a
file, and the compiled form is all there is otherwise.

For a method, the class of the instance counts too (with its MRO's user classes): a ``Maker``
subclass of a script that inherits ``make`` from atomate2 but overrides a helper counts with its
own source. Installed code is never hashed (an upgrade of atomate2 must not wipe a cache): the
top-level packages it comes from are recorded (:func:`JobCode.packages`), and
:func:`version_differences` says when an entry was recorded under other versions.

An explicit ``cache_version`` replaces the job function's own source (the user takes
responsibility for it, like redun's ``version=``); the user code it references still counts.
Digests are memoised per function object (and instance class): code is read once per process.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import re
import site
import sys
import sysconfig
import tokenize
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from fractions import Fraction
from importlib import metadata
from pathlib import PurePath
from typing import Any
from uuid import UUID
from warnings import warn

from jobflow_cache.errors import CacheWarning
from jobflow_cache.hashing.canonical import digest_bytes, digest_value

__all__ = [
    "JobCode",
    "argument_code",
    "cache_version_slot",
    "code_differences",
    "code_digest",
    "current_versions",
    "describe_slot",
    "editable_distributions",
    "env_names",
    "env_part",
    "installed_roots",
    "is_user_file",
    "is_user_module",
    "instance_type",
    "is_local",
    "job_code",
    "local_identity",
    "packages_of",
    "version_differences",
]

logger = logging.getLogger(__name__)

#: Most objects (functions, classes, constants) one code digest visits; past it the digest holds
#: a marker and the job is still cached (its own source always counts).
MAX_OBJECTS = 5_000

#: Parts of the cache_version slot, in this order; a user ``cache_version`` comes last, verbatim.
_PARTS = ("code", "uses", "args", "env")
_OWN_PACKAGE = "jobflow_cache"

#: Names of the parts, for :func:`code_differences`.
_PART_NAMES = {
    "code": "the job function's own source",
    "uses": "the user code it uses (functions, classes, module-level constants)",
    "args": "the user code passed in its arguments (functions, classes)",
    "env": "the environment variables added to the digest",
}


# --------------------------------------------------------------------------- user code or not


@functools.cache
def installed_roots() -> tuple[str, ...]:
    """Folders whose modules are installed code (see the module docstring), real paths."""
    roots: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        with suppress(KeyError):
            roots.add(sysconfig.get_paths()[key])
    with suppress(AttributeError):
        roots.update(site.getsitepackages())
    with suppress(AttributeError):
        roots.add(site.getusersitepackages())
    for entry in sys.path:
        if os.path.basename(entry.rstrip(os.sep)) in {"site-packages", "dist-packages"}:
            roots.add(entry)
    return tuple(sorted({os.path.realpath(r) for r in roots if r}))


def _site_like_entries() -> tuple[str, ...]:
    # sys.path entries added after the first call (site.addsitedir) are site folders too
    return tuple(
        os.path.realpath(entry)
        for entry in sys.path
        if os.path.basename(entry.rstrip(os.sep)) in {"site-packages", "dist-packages"}
    )


def is_user_file(path: str, roots: Iterable[str] | None = None) -> bool:
    """True when a source file ``path`` is user code: not inside any of ``roots``.

    ``roots`` defaults to :func:`installed_roots` and the ``site-packages`` entries of
    ``sys.path``.

    Examples
    --------
    >>> is_user_file("/venv/lib/python3.11/site-packages/pkg/mod.py", ["/venv/lib/python3.11"])
    False
    >>> is_user_file("/home/me/project/helpers.py", ["/venv/lib/python3.11"])
    True
    """
    return _is_user_file(path, tuple(roots) if roots is not None else None)


@functools.lru_cache(maxsize=4096)
def _is_user_file(path: str, roots: tuple[str, ...] | None) -> bool:
    if roots is None:
        roots = installed_roots() + _site_like_entries()
    real = os.path.realpath(path)
    for root in roots:
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return False
    return True


_USER_MODULES: dict[str, bool] = {}


def is_user_module(name: str) -> bool:
    """True when the imported module ``name`` is user code (see the module docstring).

    ``__main__`` is user code without a file (``python -c``) or with a file outside the site
    folders (a script; ``python -m pytest`` runs installed code); a module not imported, built
    in or frozen is not. jobflow-cache itself is not.

    Examples
    --------
    >>> is_user_module("json"), is_user_module("jobflow_cache.hashing.canonical")
    (False, False)
    """
    known = _USER_MODULES.get(name)
    if known is not None:
        return known
    module = sys.modules.get(name)
    if module is None:
        return False  # not memoised: it may be imported later
    result = _module_is_user(name, module)
    _USER_MODULES[name] = result
    return result


def _module_is_user(name: str, module: types.ModuleType) -> bool:
    if name == _OWN_PACKAGE or name.startswith(_OWN_PACKAGE + "."):
        return False
    file = getattr(module, "__file__", None)
    if not isinstance(file, str) or not file:
        return name == "__main__"  # python -c, a REPL, a notebook kernel
    return is_user_file(file)


def editable_distributions() -> dict[str, str]:
    """Installed distributions that are editable installs: ``{name: source folder or URL}``.

    Read from ``direct_url.json`` (``"dir_info": {"editable": true}``, PEP 610), which pip and
    uv write for ``pip install -e``. Their modules are user code because their files are outside
    the site folders; this tells which distribution they belong to.
    """
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        with suppress(Exception):
            text = dist.read_text("direct_url.json")
            if not text:
                continue
            info = json.loads(text)
            if isinstance(info, dict) and (info.get("dir_info") or {}).get("editable"):
                found[dist.metadata["Name"]] = str(info.get("url", ""))
    return found


# --------------------------------------------------------------------------- fingerprints


def _tokens(source: str) -> str:
    """The token stream of ``source`` without comments, blank lines and indentation widths."""
    out: list[str] = []
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.ENCODING}
    lines = source.splitlines(keepends=True)
    if lines and lines[0][:1] in " \t":  # a method's source is indented
        import textwrap

        source = textwrap.dedent(source)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in skip:
                continue
            if tok.type in (tokenize.INDENT, tokenize.DEDENT):
                out.append(tokenize.tok_name[tok.type])
            else:
                out.append(f"{tok.type}:{tok.string}")
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return "raw:" + source
    return "\x1f".join(out)


def _code_fingerprint(code: types.CodeType) -> str:
    """Bytecode, names and constants of ``code`` (nested code objects included, addresses not)."""
    consts = [
        _code_fingerprint(c)
        if isinstance(c, types.CodeType)
        else repr(sorted(map(repr, c)))  # `x in {"a", "b"}`: set order varies between processes
        if isinstance(c, frozenset)
        else repr(c)
        for c in code.co_consts
    ]
    return repr((code.co_code.hex(), code.co_names, code.co_varnames, code.co_freevars, consts))


def _source_fingerprint(obj: Any) -> str:
    """``source:<digest>`` of ``obj``'s token stream, or ``code:<digest>`` of its bytecode."""
    import inspect

    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError, IndexError):
        code = getattr(obj, "__code__", None)
        if isinstance(code, types.CodeType):
            return "code:" + digest_bytes(_code_fingerprint(code).encode())
        if isinstance(obj, type):  # a class without source: its methods' compiled code
            parts = [
                f"{name}={_source_fingerprint(value)}"
                for name, value in sorted(vars(obj).items())
                if isinstance(value, types.FunctionType)
            ]
            return "class:" + digest_bytes(repr((obj.__qualname__, parts)).encode())
        return "repr:" + digest_bytes(repr(obj).encode())
    return "source:" + digest_bytes(_tokens(source).encode())


# --------------------------------------------------------------------------- the walk

_PLAIN_DATA = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    tuple,
    list,
    dict,
    set,
    frozenset,
    Enum,
    PurePath,
    datetime,
    date,
    time,
    timedelta,
    Decimal,
    Fraction,
    UUID,
)
_WARNED: set[str] = set()
#: jobflow objects whose serialised form holds uuids made fresh in every process.
_RANDOM_IDS = frozenset({"Job", "Flow", "OutputReference", "Response"})


def _is_user_function(func: types.FunctionType) -> bool:
    file = func.__code__.co_filename
    if file and not file.startswith("<") and os.path.isabs(file):
        if not is_user_file(file):
            return False
        module = func.__module__
        return not (isinstance(module, str) and module.startswith(_OWN_PACKAGE + "."))
    # exec'd code (dataclass __init__, python -c): the module it was made for decides
    return isinstance(func.__module__, str) and is_user_module(func.__module__)


def _is_user_class(cls: type) -> bool:
    module = getattr(cls, "__module__", None)
    return isinstance(module, str) and is_user_module(module)


def _top(module: Any) -> str | None:
    if not isinstance(module, str) or not module or module == "__main__":
        return None
    top = module.split(".", 1)[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return None  # the Python version is recorded
    return top


class _Walk:
    """One transitive walk from a set of roots; ``items`` maps labels to fingerprints."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}
        self.packages: set[str] = set()
        self.seen: set[int] = set()
        self.keep: list[Any] = []  # keeps ids valid during the walk
        self.stack: list[tuple[Any, frozenset[str]]] = []
        self.count = 0
        #: (namespace, name, value) of every global resolved: a memoised digest holds while
        #: each name still holds its value (a notebook cell that redefines a helper)
        self.deps: list[tuple[dict[str, Any], str, Any]] = []

    def add(self, obj: Any, names: frozenset[str] = frozenset()) -> None:
        self.stack.append((obj, names))

    def run(self) -> None:
        while self.stack:
            obj, names = self.stack.pop()
            key = id(obj)
            if isinstance(obj, types.ModuleType):
                key = hash((key, names))  # a module is resolved against each set of names
            if key in self.seen:
                continue
            self.seen.add(key)
            self.keep.append(obj)
            self.count += 1
            if self.count > MAX_OBJECTS:
                self.items["!truncated"] = str(MAX_OBJECTS)
                self.stack.clear()
                return
            self._visit(obj, names)

    def _visit(self, obj: Any, names: frozenset[str]) -> None:
        if isinstance(obj, types.FunctionType):
            self._function(obj)
        elif isinstance(obj, types.MethodType):
            self.add(obj.__func__)
            owner = obj.__self__
            self.add(owner if isinstance(owner, type) else type(owner))
        elif isinstance(obj, functools.partial):
            self.add(obj.func)
            for value in (*obj.args, *obj.keywords.values()):
                self.add(value)
        elif isinstance(obj, type):
            self._class(obj)
        elif isinstance(obj, (staticmethod, classmethod)):
            self.add(obj.__func__)
        elif isinstance(obj, property):
            for part in (obj.fget, obj.fset, obj.fdel):
                if part is not None:
                    self.add(part)
        elif isinstance(obj, types.ModuleType):
            if is_user_module(obj.__name__):
                for name in names:
                    value = getattr(obj, name, _MISSING)
                    if value is not _MISSING:
                        self.deps.append((vars(obj), name, value))
                        self.add(value, names)
            else:
                top = _top(obj.__name__)
                if top:
                    self.packages.add(top)
        elif isinstance(obj, (types.BuiltinFunctionType, types.WrapperDescriptorType)):
            return
        else:
            cls = type(obj)
            if _is_user_class(cls):
                self.add(cls)
            wrapped = getattr(obj, "__wrapped__", None)  # functools.wraps around a callable
            if callable(wrapped):
                self.add(wrapped)

    def _function(self, func: types.FunctionType) -> None:
        if not _is_user_function(func):
            top = _top(func.__module__)
            if top:
                self.packages.add(top)
            # a decorator of installed code around user code (jobflow's @job keeps the
            # function as .original, functools.wraps as __wrapped__)
            for attr in ("__wrapped__", "original"):
                inner = getattr(func, attr, None)
                if isinstance(inner, (types.FunctionType, types.MethodType)) or hasattr(
                    inner, "__jobflow_cache__"
                ):  # @cached_job's callable: its __wrapped__ is the function as written
                    self.add(inner)
            return
        label = f"def {func.__module__}:{func.__qualname__}"
        self.items[label] = _source_fingerprint(func)
        self._references(func)

    def _references(self, func: types.FunctionType) -> None:
        names = _code_names(func.__code__)
        globs = func.__globals__
        module_name = globs.get("__name__", func.__module__)
        for name in names:
            if name in globs:
                self.deps.append((globs, name, globs[name]))
                self._global(module_name, name, globs[name], names)
            else:
                module = sys.modules.get(name)  # an import inside the function
                if module is not None:
                    self.add(module, names)
        for cell in func.__closure__ or ():
            with suppress(ValueError):  # an empty cell
                self._global(
                    module_name, f"<closure {func.__qualname__}>", cell.cell_contents, names
                )
        for value in func.__defaults__ or ():
            self._value(f"{module_name}:{func.__qualname__}<default>", value)
        for key, value in (func.__kwdefaults__ or {}).items():
            self._value(f"{module_name}:{func.__qualname__}<default {key}>", value)
        wrapped = getattr(func, "__wrapped__", None)
        if wrapped is not None:
            self.add(wrapped)

    def _global(self, module: str, name: str, value: Any, names: frozenset[str]) -> None:
        if isinstance(
            value,
            (
                types.FunctionType,
                types.MethodType,
                type,
                types.ModuleType,
                functools.partial,
                staticmethod,
                classmethod,
                property,
            ),
        ):
            self.add(value, names)
        elif isinstance(value, (types.BuiltinFunctionType, types.WrapperDescriptorType)):
            return
        elif is_user_module(module):
            self._value(f"{module}:{name}", value)
        else:
            self.add(value)

    def _value(self, label: str, value: Any) -> None:
        """A constant of user code: its value (a default, a module-level global, a cell)."""
        if callable(value) and not isinstance(value, type) and not hasattr(value, "as_dict"):
            self.add(value)  # a callable object: its class (and a wrapped function)
            return
        if isinstance(value, (types.FunctionType, type, types.ModuleType, functools.partial)):
            self.add(value)
            return
        cls = type(value)
        if _is_user_class(cls):
            self.add(cls)
        if isinstance(value, logging.Logger):
            return
        if cls.__module__.startswith("jobflow.") and cls.__name__ in _RANDOM_IDS:
            self.items[f"const {label}"] = f"object:{cls.__qualname__}"  # fresh uuids each run
            return
        try:
            self.items[f"const {label}"] = digest_value(value)
            return
        except Exception as err:
            error = err
        # no JSON form: its repr without addresses (a compiled regex, a sentinel, a lock)
        try:
            text = _ADDRESS_RE.sub("", repr(value))
        except Exception:
            text = ""
        self.items[f"const {label}"] = (
            f"repr:{cls.__module__}.{cls.__qualname__}:{digest_bytes(text.encode())}"
        )
        if (text and not _is_user_class(cls)) or label in _WARNED:
            return
        _WARNED.add(label)
        warn(
            f"jobflow-cache: the value of {label} (a {cls.__qualname__}), used by a job's code, "
            f"cannot be hashed ({error}); only its repr counts in the job's digest, so set "
            "cache_version when it changes in another way",
            CacheWarning,
            stacklevel=2,
        )

    def _class(self, cls: type) -> None:
        if not _is_user_class(cls):
            top = _top(getattr(cls, "__module__", None))
            if top:
                self.packages.add(top)
            return
        self.items[f"class {cls.__module__}:{cls.__qualname__}"] = _source_fingerprint(cls)
        for value in vars(cls).values():
            if isinstance(
                value, (types.FunctionType, staticmethod, classmethod, property, functools.partial)
            ):
                self.add(value)
        for base in cls.__mro__[1:]:
            self.add(base)

    def digest(self) -> str | None:
        if not self.items:
            return None
        return digest_bytes(repr(sorted(self.items.items())).encode())[:16]


_MISSING = object()
_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


def _code_names(code: types.CodeType) -> frozenset[str]:
    names: set[str] = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return frozenset(names)


# --------------------------------------------------------------------------- local functions
#
# A lambda, or a function or class defined inside a function, is not identified by its
# ``module:qualname``: every call of the enclosing function makes a new one of the same name,
# with other closure values, and an edit may keep the name. Its identity is what it can read
# that the name cannot show: its compiled code (with the argument counts and flags of every
# code object), the values in its closure cells, its defaults, ``__wrapped__``, and, through
# cells, the same for the local functions and classes it captures; the globals it reads count
# as for any job (the walk above). The values are hashed as inputs are (digest_value), on every
# call (a cell can be rebound, a captured list mutated): one that cannot be hashed makes the job
# uncached (UnhashableInputError), never a digest that would not tell two functions apart.
#
# Why compiled code and not the source's token stream (which module-level functions use): the
# source is read from the file as it is now (linecache), which for a function object made
# before an edit (a notebook kernel, a long-running test session) is not the code that runs,
# two lambdas on one line share one source, and exec'd code has none. The compiled code is
# exactly what runs, exists always, ignores comments and line numbers as the token stream
# does; it changes with the Python version, so a cache shared across Python versions misses
# for local functions (a miss, never a false hit).

#: jobflow objects whose identity is a uuid made fresh in every run: no stable value.
_JOBFLOW_RANDOM = _RANDOM_IDS
#: dataclasses' sentinels held in the cells of the methods it generates
_SENTINEL_TYPES = frozenset({"_MISSING_TYPE", "_HAS_DEFAULT_FACTORY_CLASS", "_KW_ONLY_TYPE"})
#: class attributes that are not behaviour (names, docs, annotations, bookkeeping of
#: dataclasses, abc, typing, pydantic); functions under dunder names (__init__) do count
_CLASS_SKIP = frozenset(
    {
        "__module__",
        "__qualname__",
        "__doc__",
        "__dict__",
        "__weakref__",
        "__annotations__",
        "__dataclass_fields__",
        "__dataclass_params__",
        "__match_args__",
        "__slots__",
        "__orig_bases__",
        "__parameters__",
        "__abstractmethods__",
        "__firstlineno__",
        "__static_attributes__",
        "__hash__",
    }
)
#: what functools.update_wrapper copies, and @cached_job's options (no behaviour)
_WRAPPER_KEYS = frozenset(
    {*functools.WRAPPER_ASSIGNMENTS, "__wrapped__", "__dict__", "__jobflow_cache__"}
)
_LOCATOR_RE = re.compile(rb'"@(?:class|callable)":"((?:[^"\\]|\\.)*<(?:[^"\\]|\\.)*)"')


def is_local(obj: Any) -> bool:
    """True for a lambda, or a function or class defined inside a function (``<`` in its
    qualname): its ``module:qualname`` does not identify it.

    Examples
    --------
    >>> import json
    >>> is_local(json.dumps), is_local(lambda: 0)
    (False, True)
    """
    qualname = getattr(obj, "__qualname__", None)
    return isinstance(qualname, str) and "<" in qualname


@functools.lru_cache(maxsize=4096)
def _local_code(code: types.CodeType) -> str:
    """Compiled code with what its bytecode does not show (argument kinds, flags)."""
    shape = []
    stack = [code]
    while stack:
        c = stack.pop()
        shape.append(
            (c.co_argcount, c.co_posonlyargcount, c.co_kwonlyargcount, c.co_flags, c.co_cellvars)
        )
        stack.extend(x for x in c.co_consts if isinstance(x, types.CodeType))
    return digest_bytes(repr((shape, _code_fingerprint(code))).encode())


def local_identity(function: Any, instance_type: type | None = None) -> str | None:
    """Digest of what identifies a local job function (and a local class of its instance).

    None when neither ``function`` nor any class of ``instance_type``'s MRO is local (a
    module-level function is identified by its path and :func:`job_code`). Computed on every
    call, since closure cells can be rebound and captured values mutated.

    Raises
    ------
    UnhashableInputError
        When a value it captures (a closure cell, a default, a class attribute) cannot be
        hashed: the job cannot be told apart from another of the same name, so it runs
        uncached.
    """
    func = function.__func__ if isinstance(function, types.MethodType) else function
    parts: list[tuple[str, str]] = []
    if is_local(func):
        parts.append(("function", _strict(func, frozenset(), _where(func))))
    if instance_type is not None:
        for cls in instance_type.__mro__:
            if is_local(cls):
                parts.append((f"class {cls.__qualname__}", _local_class(cls, frozenset())))
    if not parts:
        return None
    return digest_bytes(repr(parts).encode())


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', '?')}"


def _local_function(func: types.FunctionType, active: frozenset[int]) -> str:
    if id(func) in active:
        return "recursive:" + func.__qualname__
    active = active | {id(func)}
    code = func.__code__
    where = _where(func)
    parts = [("code", _local_code(code))]
    for name, cell in zip(code.co_freevars, func.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # not assigned yet: reading it raises NameError
            parts.append((f"cell {name}", "empty"))
            continue
        parts.append((f"cell {name}", _strict(value, active, f"{where}, closure variable {name}")))
    for i, value in enumerate(func.__defaults__ or ()):
        parts.append((f"default {i}", _strict(value, active, f"{where}, default {i}")))
    for key, value in sorted((func.__kwdefaults__ or {}).items()):
        parts.append((f"kwdefault {key}", _strict(value, active, f"{where}, default {key}")))
    wrapped = getattr(func, "__wrapped__", None)
    if wrapped is not None:
        parts.append(("wrapped", _strict(wrapped, active, f"{where}.__wrapped__")))
    return digest_bytes(repr(parts).encode())


def _local_class(cls: type, active: frozenset[int]) -> str:
    if id(cls) in active:
        return "recursive:" + cls.__qualname__
    active = active | {id(cls)}
    parts = [("qualname", cls.__qualname__)]
    for name, value in sorted(vars(cls).items()):
        behaviour = isinstance(
            value, (types.FunctionType, staticmethod, classmethod, property, functools.partial)
        )
        if name in _CLASS_SKIP and not behaviour:
            continue
        if name.startswith("__") and name.endswith("__") and not behaviour:
            continue  # pydantic's and typing's bookkeeping
        if name.startswith("_abc_") or isinstance(
            value, (types.MemberDescriptorType, types.GetSetDescriptorType)
        ):
            continue
        parts.append((name, _strict(value, active, f"{_where(cls)}.{name}")))
    for base in cls.__mro__[1:]:
        if is_local(base):
            parts.append(("base", _local_class(base, active)))
        else:  # module-level: by its path; its code counts in the walk (job_code's uses)
            parts.append(("base", f"{base.__module__}:{base.__qualname__}"))
    return digest_bytes(repr(parts).encode())


def _strict(value: Any, active: frozenset[int], where: str) -> str:
    """What a local function reads in ``value``; raises UnhashableInputError if unknowable."""
    from jobflow_cache.errors import UnhashableInputError
    from jobflow_cache.hashing.canonical import canonicalize, encode

    if isinstance(value, types.FunctionType):
        if is_local(value):
            return "fn:" + _local_function(value, active)
        return f"fn:{_where(value)}:{code_digest(value) or 'installed'}"
    if isinstance(value, type):
        if is_local(value):
            return "class:" + _local_class(value, active)
        return f"class:{_where(value)}:{code_digest(value) or 'installed'}"
    if isinstance(value, types.MethodType):
        owner = _strict(value.__self__, active, where)
        return f"method:{_strict(value.__func__, active, where)}|{owner}"
    if isinstance(value, types.ModuleType):
        return "module:" + value.__name__
    if isinstance(value, (types.BuiltinFunctionType, types.WrapperDescriptorType)):
        bound = getattr(value, "__self__", None)
        name = f"builtin:{getattr(value, '__module__', None)}:{value.__qualname__}"
        if bound is None or isinstance(bound, (types.ModuleType, type)):
            return name
        return f"{name}|{_strict(bound, active, where)}"  # list.append of a captured list
    if isinstance(value, (staticmethod, classmethod)):
        return "descriptor:" + _strict(value.__func__, active, where)
    if isinstance(value, property):
        parts = (value.fget, value.fset, value.fdel)
        return "property:" + "|".join(
            "-" if part is None else _strict(part, active, where) for part in parts
        )
    if isinstance(value, functools.partial):
        return (
            f"partial:{_strict(value.func, active, where)}|"
            f"{_strict(list(value.args), active, where)}|{_strict(value.keywords, active, where)}"
        )
    wrapped = getattr(value, "__wrapped__", None)
    if wrapped is not None and callable(value) and callable(wrapped):
        # @cached_job's callable, a callable object wrapping a function: the function it
        # calls, and the object's own state (a class-based decorator's parameters)
        state = {
            key: item
            for key, item in getattr(value, "__dict__", {}).items()
            if key not in _WRAPPER_KEYS
        }
        own = _strict(state, active, where) if state else "-"
        return f"wrapper:{_where(type(value))}|{own}|{_strict(wrapped, active, where)}"
    cls = type(value)
    if cls.__module__ == "dataclasses" and cls.__name__ in _SENTINEL_TYPES:
        return "sentinel:" + cls.__name__
    if cls.__module__ in ("typing", "types", "typing_extensions"):
        return "typing:" + repr(value)  # an annotation held by a generated __init__
    if isinstance(value, logging.Logger):
        return "logger:" + value.name
    if cls.__module__.startswith("jobflow.") and cls.__name__ in _JOBFLOW_RANDOM:
        raise UnhashableInputError(
            f"{where} holds a jobflow {cls.__name__}, whose uuid is new in every run"
        )
    if isinstance(value, (list, tuple, set, frozenset)) and any(
        callable(item) for item in value
    ):  # functions in a container: each by its code
        items = [_strict(item, active, where) for item in value]
        if isinstance(value, (set, frozenset)):
            items.sort()
        return f"{cls.__name__}:[{','.join(items)}]"
    if isinstance(value, dict) and any(callable(item) for item in value.values()):
        pairs = sorted(
            f"{digest_value(key)}={_strict(item, active, where)}" for key, item in value.items()
        )
        return f"dict:{{{','.join(pairs)}}}"
    try:
        data = encode(canonicalize(value))
    except Exception as err:
        raise UnhashableInputError(
            f"{where} holds a {cls.__qualname__}, which cannot be hashed ({err})"
        ) from None
    own = _where(cls)
    for found in _LOCATOR_RE.findall(data):
        # a local class's name in the value: which class it is cannot be told from its name
        # (only the value's own class is known here)
        if not own.endswith(":" + found.decode()):
            raise UnhashableInputError(
                f"{where} holds an object of a class defined inside a function "
                f"({found.decode()}) that cannot be identified by its name"
            )
    result = "value:" + digest_bytes(data)
    if is_local(cls):
        result += "|class:" + _local_class(cls, active)
    elif _is_user_class(cls):
        result += f"|class:{code_digest(cls)}"
    mine = {(cls.__module__, cls.__qualname__), (cls.__module__, cls.__name__)}
    named = [
        f"{m}:{q}={_named_code(m, q)}"
        for m, q in _argument_code(data)
        if "<" not in q and not (is_local(cls) and (m, q) in mine)
    ]
    if named:  # user classes and functions named inside the value (as argument_code does)
        result += "|named:" + digest_bytes(repr(sorted(named)).encode())
    return result


# --------------------------------------------------------------------------- public API


@dataclasses.dataclass(frozen=True)
class JobCode:
    """The code parts of a job's digest.

    Attributes
    ----------
    own
        Fingerprint of the job function's own source (None: installed code, or replaced by an
        explicit ``cache_version``).
    uses
        Digest of the user code it references, and of the instance's user classes for a method
        (None: none).
    packages
        Top-level packages of the installed code it comes from (the function's, its class's
        MRO, referenced functions and classes).
    """

    own: str | None
    uses: str | None
    packages: tuple[str, ...] = ()


_Deps = tuple[tuple[dict[str, Any], str, Any], ...]
_JOB_CODES: weakref.WeakKeyDictionary[Any, dict[Any, tuple[JobCode, _Deps]]] = (
    weakref.WeakKeyDictionary()
)


def job_code(
    function: Callable[..., Any], instance_type: type | None = None, *, versioned: bool = False
) -> JobCode:
    """The code parts of a job calling ``function`` (for a method, on an ``instance_type``).

    ``versioned``: the user set ``cache_version``, which replaces the function's own source.
    Memoised per function object and instance class; for a lambda or a function or class
    defined inside a function, :func:`local_identity` counts too, computed on every call.

    Raises
    ------
    UnhashableInputError
        For a local function (or a local class of the instance) that captures a value that
        cannot be hashed (see :func:`local_identity`).
    """
    local = local_identity(function, instance_type)  # raises when it cannot be known
    code = _memoised_job_code(function, instance_type, versioned)
    if local is None:
        return code
    # a local function: its name does not identify it, its compiled code and captured values
    # do (see local_identity); counted even with a cache_version, which cannot tell apart two
    # functions of one name that live side by side
    own = digest_bytes(f"{code.own}|local:{local}".encode())[:16]
    return dataclasses.replace(code, own=own)


def _memoised_job_code(
    function: Callable[..., Any], instance_type: type | None, versioned: bool
) -> JobCode:
    try:
        memo = _JOB_CODES.get(function)
    except TypeError:
        memo = None
    key = (instance_type, versioned)
    if memo is not None:
        hit = memo.get(key)
        if hit is not None:
            found, deps = hit
            for namespace, name, value in deps:
                if namespace.get(name, _MISSING) is not value:
                    break
            else:
                return found
    result, walked = _job_code(function, instance_type, versioned)
    path = f"{getattr(function, '__module__', '')}:{getattr(function, '__qualname__', '')}"
    _PACKAGES.setdefault(path, set()).update(result.packages)
    with suppress(TypeError):
        _JOB_CODES.setdefault(function, {})[key] = (result, tuple(walked))
    return result


def _job_code(
    function: Any, instance_type: type | None, versioned: bool
) -> tuple[JobCode, list[tuple[dict[str, Any], str, Any]]]:
    func = function.__func__ if isinstance(function, types.MethodType) else function
    own: str | None = None
    walk = _Walk()
    if isinstance(func, types.FunctionType):
        if _is_user_function(func):
            if not versioned:
                own = _source_fingerprint(func)[:48]
            walk._references(func)
        else:
            top = _top(func.__module__)
            if top:
                walk.packages.add(top)
    else:
        walk.add(func)
    if instance_type is not None:
        walk.add(instance_type)
    walk.run()
    own_digest = None if own is None else digest_bytes(own.encode())[:16]
    return JobCode(own_digest, walk.digest(), tuple(sorted(walk.packages))), walk.deps


_CODE_DIGESTS: weakref.WeakKeyDictionary[Any, tuple[str | None, _Deps]] = (
    weakref.WeakKeyDictionary()
)


def code_digest(obj: Any) -> str | None:
    """Digest of the user code of a callable or class ``obj`` (with what it references).

    None when ``obj`` is installed code (named by its path alone). Memoised per object.

    Examples
    --------
    >>> import json
    >>> code_digest(json.dumps) is None
    True
    """
    try:
        result, deps = _CODE_DIGESTS[obj]
    except (KeyError, TypeError):
        pass
    else:
        if all(namespace.get(name, _MISSING) is value for namespace, name, value in deps):
            return result
    walk = _Walk()
    walk.add(obj)
    walk.run()
    result = walk.digest()
    with suppress(TypeError):
        _CODE_DIGESTS[obj] = (result, tuple(walk.deps))
    return result


_MODULE_RE = re.compile(rb'"@module":"((?:[^"\\]|\\.)*)"')
#: user-code ``(module, qualname)`` named in each argument (by its digest)
_ARG_CODES: dict[str, tuple[tuple[str, str], ...]] = {}


def argument_code(
    encodings: Mapping[str, bytes], arg_digests: Mapping[str, str], covered: type | None = None
) -> str | None:
    """Digest of the user code named in the canonical arguments, or None when there is none.

    A function or class passed as an argument is hashed by its ``module:qualname`` (monty's
    form), and so is the class of an MSONable object: ``__main__:f`` names another function in
    every script. This finds those of user code in the encodings (memoised per argument digest)
    and digests their code. ``covered``: a class whose code counts already (a method's
    instance class, see :func:`job_code`), left out so that the call is not digested twice.
    """
    if not any(b'"@module"' in data for data in encodings.values()):
        return None  # no function, class or object named (what _argument_code looks for)
    # the covered class as monty names it: "@class" is its __name__ (a class defined inside a
    # function is not found under it; its code counts through local_identity)
    skip = (
        {(covered.__module__, covered.__qualname__), (covered.__module__, covered.__name__)}
        if covered is not None
        else set()
    )
    found: list[str] = []
    for name, data in encodings.items():
        key = arg_digests.get(name, "")
        cached = _ARG_CODES.get(key)
        if cached is None:
            cached = _argument_code(data)
            if len(_ARG_CODES) > 10_000:
                _ARG_CODES.clear()
            _ARG_CODES[key] = cached
        for module, qualname in cached:
            if (module, qualname) not in skip:
                found.append(f"{name}/{module}:{qualname}={_named_code(module, qualname)}")
    if not found:
        return None
    return digest_bytes(repr(sorted(found)).encode())[:16]


def _named_code(module: str, qualname: str) -> str:
    """Code digest of the object ``module:qualname`` names now (resolved on every call: a
    notebook may redefine it)."""
    obj: Any = sys.modules.get(module)
    for attr in qualname.split("."):
        obj = getattr(obj, attr, _MISSING)
        if obj is _MISSING or "<" in attr:
            # a class defined inside a function (a local Maker or dataclass in an argument;
            # monty names it by __name__ alone): the name does not say which of the classes
            # of that name it is, so its code cannot be found and cannot count
            from jobflow_cache.errors import UnhashableInputError

            raise UnhashableInputError(
                f"an argument holds an object of {module}:{qualname}, which is not found under "
                "that name (a class defined inside a function?), so its code cannot be hashed"
            )
    return code_digest(obj) or "installed"


def _argument_code(data: bytes) -> tuple[tuple[str, str], ...]:
    if b'"@module"' not in data:
        return ()
    modules = {m.decode() for m in _MODULE_RE.findall(data)}
    if not any(is_user_module(m) for m in modules if "\\" not in m):
        return ()
    import orjson

    named: set[tuple[str, str]] = set()
    stack = [orjson.loads(data)]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            module = node.get("@module")
            qualname = node.get("@callable", node.get("@class"))
            if isinstance(module, str) and isinstance(qualname, str) and is_user_module(module):
                named.add((module, qualname))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return tuple(sorted(named))


def env_names(*sources: Iterable[str] | str | None) -> tuple[str, ...]:
    """Sorted unique environment variable names from lists or comma-separated strings.

    Examples
    --------
    >>> env_names("OMP_NUM_THREADS, MKL_NUM_THREADS", ["OMP_NUM_THREADS"])
    ('MKL_NUM_THREADS', 'OMP_NUM_THREADS')
    """
    if not any(sources):
        return ()
    names: set[str] = set()
    for source in sources:
        if not source:
            continue
        items = source.split(",") if isinstance(source, str) else source
        names.update(str(item).strip() for item in items if str(item).strip())
    return tuple(sorted(names))


def env_part(names: tuple[str, ...]) -> str | None:
    """``NAME,NAME:<digest of their values>`` (an unset variable differs from an empty one)."""
    if not names:
        return None
    values = [[name, os.environ.get(name)] for name in names]
    return ",".join(names) + ":" + digest_bytes(json.dumps(values).encode())[:16]


def cache_version_slot(
    version: str | None, code: JobCode, args: str | None = None, env: str | None = None
) -> str | None:
    """The string digested in the cache_version slot: the code parts, then the user's version.

    Examples
    --------
    >>> cache_version_slot("2", JobCode(None, None))
    '2'
    >>> cache_version_slot(None, JobCode("ab", "cd"), env="X:ef")
    'code:ab|uses:cd|env:X:ef'
    """
    parts = [
        f"{key}:{value}"
        for key, value in zip(_PARTS, (code.own, code.uses, args, env))
        if value is not None
    ]
    if not parts:
        return version
    if version is not None:
        parts.append(f"version:{version}")
    return "|".join(parts)


def _split_slot(slot: str | None) -> dict[str, str]:
    if slot is None:
        return {}
    parts: dict[str, str] = {}
    rest = slot
    while rest:
        key, sep, tail = rest.partition(":")
        if key not in _PARTS or not sep:
            parts["version"] = rest  # a plain user version
            break
        if key in parts:
            break
        value, _, rest = tail.partition("|")
        parts[key] = value  # env's value is NAMES:digest
        if rest.startswith("version:"):
            parts["version"] = rest[len("version:") :]
            break
    return parts


def describe_slot(slot: str | None) -> str:
    """The cache_version slot of an entry in words, for ``cachetool show``.

    Examples
    --------
    >>> describe_slot("code:aa|uses:bb|env:OMP_NUM_THREADS:cc|version:2")
    'version 2; own source aa; uses user code bb; env OMP_NUM_THREADS'
    >>> describe_slot(None)
    '-'
    """
    parts = _split_slot(slot)
    words = []
    if "version" in parts:
        words.append(f"version {parts['version']}")
    labels = {"code": "own source", "uses": "uses user code", "args": "user code in arguments"}
    for key, label in labels.items():
        if key in parts:
            words.append(f"{label} {parts[key]}")
    if "env" in parts:
        words.append(f"env {parts['env'].rpartition(':')[0]}")
    return "; ".join(words) or "-"


def code_differences(recorded: str | None, now: str | None) -> list[str]:
    """What changed between two cache_version slots, in words (for ``explain``).

    Examples
    --------
    >>> code_differences("code:aa|uses:bb", "code:aa|uses:cc")
    ['the user code it uses (functions, classes, module-level constants) changed']
    >>> code_differences("code:aa|version:1", "code:aa|version:2")
    ["cache_version '1' -> '2'"]
    """
    if recorded == now:
        return []
    old, new = _split_slot(recorded), _split_slot(now)
    notes = []
    for key in _PARTS:
        if old.get(key) == new.get(key):
            continue
        if key == "env":
            old_names = old.get(key, "").rpartition(":")[0]
            new_names = new.get(key, "").rpartition(":")[0]
            if old_names != new_names:
                notes.append(
                    f"the environment variables in the digest changed: "
                    f"{old_names or '(none)'} -> {new_names or '(none)'}"
                )
            else:
                notes.append(f"the value of an environment variable changed ({new_names})")
        elif key not in old:
            notes.append(f"{_PART_NAMES[key]} counts now but did not when recorded")
        elif key not in new:
            notes.append(f"{_PART_NAMES[key]} counted when recorded but does not now")
        else:
            notes.append(f"{_PART_NAMES[key]} changed")
    if old.get("version") != new.get("version"):
        notes.append(f"cache_version {old.get('version')!r} -> {new.get('version')!r}")
    return notes


# --------------------------------------------------------------------------- versions


@functools.cache
def _distribution_names() -> Mapping[str, list[str]]:
    try:
        return metadata.packages_distributions()
    except Exception:  # a broken distribution's metadata
        return {}


@functools.lru_cache(maxsize=1024)
def _version_of(name: str) -> tuple[str, str] | None:
    """``(distribution, version)`` of a top-level import name or distribution name."""
    with suppress(metadata.PackageNotFoundError, ValueError):
        return name, metadata.version(name)
    if is_user_module(name):
        # user code is not installed code (see the module docstring): no distribution of the
        # site folders holds it, and the name-to-distribution map reads every installed
        # distribution's file list (~0.1 s, paid by the first entry a process records)
        return None
    for dist in _distribution_names().get(name, ()):
        with suppress(metadata.PackageNotFoundError, ValueError):
            return dist, metadata.version(dist)
    return None


def current_versions(names: Iterable[str]) -> dict[str, str]:
    """Versions installed now of ``names`` (distributions or top-level packages; ``python``)."""
    import platform

    versions: dict[str, str] = {}
    for name in names:
        if name == "python":
            versions[name] = platform.python_version()
            continue
        found = _version_of(name)
        if found is not None:
            versions[found[0]] = found[1]
    return versions


def version_differences(recorded: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """The packages (and Python) whose version differs between an entry and now, in words.

    Only names recorded in the entry are compared; a package not installed now says so.

    Examples
    --------
    >>> version_differences({"atomate2": "0.0.14", "python": "3.11.4"}, {"atomate2": "0.0.15",
    ...     "python": "3.11.4"})
    ['atomate2 0.0.14 -> 0.0.15']
    """
    notes = []
    for name in sorted(recorded):
        old, new = recorded[name], now.get(name)
        if new is None:
            notes.append(f"{name} {old} -> not installed")
        elif old != new:
            notes.append(f"{name} {old} -> {new}")
    return notes


_OWNERS: weakref.WeakKeyDictionary[Any, type | None] = weakref.WeakKeyDictionary()


def _owner(function: Any) -> type | None:
    """The class a function is defined in (from its qualname), or None."""
    try:
        return _OWNERS[function]
    except (KeyError, TypeError):
        pass
    owner: Any = None
    qualname = getattr(function, "__qualname__", "")
    prefix = qualname.rpartition(".")[0] if isinstance(qualname, str) else ""
    if prefix and "<" not in prefix:
        owner = sys.modules.get(getattr(function, "__module__", None) or "")
        for attr in prefix.split("."):
            owner = getattr(owner, attr, None)
    owner = owner if isinstance(owner, type) else None
    with suppress(TypeError):
        _OWNERS[function] = owner
    return owner


def instance_type(function: Callable[..., Any], args: Any) -> type | None:
    """For a method called with its instance first (``Maker.make(maker, ...)``), the class of
    that instance; else None."""
    if not args:
        return None
    owner = _owner(function)
    if owner is None:
        if is_local(function) and _defines(type(args[0]), function):
            return type(args[0])  # a method of a class defined inside a function
        return None
    if not isinstance(args[0], owner):
        return None
    return type(args[0])


def _defines(cls: type, function: Any) -> bool:
    """True when a class of ``cls``'s MRO holds ``function`` (a method, maybe decorated)."""
    qualname = getattr(function, "__qualname__", "")
    prefix, _, name = qualname.rpartition(".")
    for klass in cls.__mro__:
        if klass.__qualname__ != prefix:
            continue
        value: Any = vars(klass).get(name)
        for _ in range(8):  # jobflow's job wrapper -> .original -> __wrapped__ -> function
            if value is function:
                return True
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
                continue
            value = getattr(value, "original", None) or getattr(value, "__wrapped__", None)
            if value is None:
                break
    return False


#: Top-level packages of the installed code each job function path came from in this process.
_PACKAGES: dict[str, set[str]] = {}


def packages_of(function_path: str) -> tuple[str, ...]:
    """Top-level packages of the installed code the jobs of ``function_path`` came from in this
    process (the function's and its Maker class's packages, referenced installed code)."""
    return tuple(sorted(_PACKAGES.get(function_path, ())))
