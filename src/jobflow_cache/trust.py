"""The trust check: what a value read from a shared store may name before monty's decoder sees it.

A cache shared by a group is written by others. monty's ``MontyDecoder`` imports the module of
every ``"@module"`` it meets, calls the ``from_dict`` (or the constructor, for pydantic models
and dataclasses) of the class it names, and returns the function named by ``"@callable"``;
jobflow then *runs* the jobs of a replayed dynamic response and calls their output schema. So
every document node of a cached value is checked first, at any depth (inside lists, dicts,
pydantic fields, ``"@bound"`` objects, tagged containers), by this rule:

**A node is decoded only when all of these hold** (else the whole entry is refused: it is an
invalid entry, the job runs and records a sound one):

1. *Its module runs only installed code when imported*: it is imported already, or belongs
   to an installed distribution that is not the standard library. Never a file that merely
   sits on ``sys.path`` (a script in the working folder). A module that does not exist is
   left as data by monty.
2. *Standard-library classes only where they are plain data*: monty's own handlers
   (``datetime.datetime``, ``uuid.UUID``, ``pathlib.Path``: a ``Path`` is a name, nothing
   is read), ``Enum`` members, and classes monty leaves as the dict they are (no
   ``from_dict``, no dataclass, no pydantic model: ``subprocess.Popen`` stays a dict). Other
   standard-library classes (dataclasses monty would build) are refused.
3. *monty's handlers of third-party types decode nothing they were not shown*: a pandas
   ``DataFrame``/``Series`` holds JSON *text* that monty decodes with a fresh decoder, so
   that text is parsed and checked by this same rule (it would otherwise hide documents from
   the check); a torch tensor's ``dtype`` is a string torch imports by name, so it must name
   a torch tensor type.
4. *The class is not one that reaches outside the document* (a denylist of known
   decoders of further data): pydantic ``BaseSettings`` (they read the environment, ``.env``
   files and secrets folders; jobflow's ``JobflowSettings`` decodes the YAML file named by
   ``CONFIG_FILE`` with monty's decoder, which imports whatever it names), maggma ``Store``
   and jobflow ``JobStore`` (connections), anything from ``fireworks`` (its deserializer
   imports classes named by ``_fw_name``), ``jobflow_remote`` and ``jobflow_cache`` itself
   (settings, stores, runners; but for ``cache_flow``'s ``CachedFunction``, whose inner
   function is a nested ``"@callable"`` held to rule 6).
5. *The code the decoder runs for it names no reader*: the class's own ``from_dict``,
   ``__init__``, ``__new__``, ``__post_init__``, ``model_post_init`` and pydantic validators
   (and, to a small depth, the functions and methods they call by name, and the models and
   dataclasses its pydantic fields are typed with, which pydantic builds from plain dicts)
   are read as bytecode: a class whose decoding names ``open``, ``loadfn``, ``zopen``,
   ``read_text``, ``os.environ``, ``getenv``, ``import_module``, ``__import__``, ``exec``,
   ``eval``, ``subprocess``, ``socket``, ``urlopen``, a database client, ... is refused.
   A call by name is followed into every definition along the class's MRO (so
   ``super().__post_init__()`` is read too), and so is a property read or set
   (``self.structure = ...`` runs its setter). This is a signature check, a second line behind
   rules 1-4, not a proof; it is what turns away pymatgen's ``Vasprun(filename=...)`` and
   ``Outcar`` (they read the file they are given) and any pydantic model with a
   ``model_validator(mode="before")`` that loads a file.

   *Value-aware exceptions* (:data:`_REVIEWED`): a few decoding functions were read by hand
   and name a reader only to read what the document itself says, or a fixed file of their
   own package. Such a function's readers are excused for classes with its owner in their
   MRO (subclasses count; what a subclass adds is scanned as usual), and a document of the
   class is then accepted only if the function's *gate* holds for that document (checked per
   document, never memoised per class):

   - ``pymatgen.io.vasp.sets.VaspInputSet.__post_init__`` (every atomate2 VASP input
     generator): ``Incar``/``Kpoints.from_file`` only when ``prev_incar``/``prev_kpoints``
     is a ``str`` or ``Path``; gate: those fields (or, when absent, the dataclass defaults)
     hold None, a plain dict, or a document of a class that is no ``str``/``bytes``/
     ``PathLike`` (an ``Incar`` document, itself checked by the walk). A string, a ``Path``
     document, a str ``Enum``, a list, a ``"@callable"`` or an unknown class is refused.
     Its ``loadfn`` reads pymatgen's own ``vdW_parameters.yaml`` (``vdw`` is a key in it).
   - ``MPScanRelaxSet.__post_init__`` (the same fixed ``loadfn``), and
     ``BaseLammpsSetGenerator.__post_init__`` (``from_file`` of a template of its own
     ``TEMPLATE_DIR`` picked from constants): no gate.
   - ``AbstractComparator.from_dict`` (structure matcher) and
     ``AbstractMolAtomMapper.from_dict``: ``__import__`` of a constant module (a module, not a
     package, so the fromlist imports nothing), then the class the document's ``@class``
     names there; gate: that name is a subclass of the abstract base in that module, passing
     rule 5 itself.

   An exception holds only while the function's code reads the same names as when reviewed
   (:func:`_fingerprint`); when an upgrade changes it the class is refused again, with a
   reason saying so, until the new code is read and its fingerprint added. A pydantic field
   typed with a gated class is refused (pydantic builds it from a plain dict the walk does not
   see as a document).
6. ``"@callable"`` must be a jobflow job function (``@job``/``@cached_job``, a Maker's job
   method included, or a :mod:`jobflow_cache.marking` wrapper of one), or a class passing
   rules 1-5 (an output schema): never ``subprocess.call`` or ``eval``. In one place a class
   need not pass rules 2-5: the additional-store ``**kwargs`` of a jobflow ``Job`` document
   (atomate2's VASP jobs carry ``data=[Wavecar, BandStructure, ...]``), which jobflow only
   hands to ``JobStore.update(save=...)`` to compare a class's name with documents, never to
   call; there it must be a class of an installed, non-standard-library module.

``JOBFLOW_CACHE_TRUSTED_MODULES`` lifts the checks for the modules it names (``*``: all).
Verdicts are memoised per class and per function, so a dynamic response of 10,000 jobs
checks its function once.
"""

from __future__ import annotations

import dataclasses
import dis
import functools
import hashlib
import hmac
import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import types
import typing
from enum import Enum
from importlib import metadata
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from monty.json import MSONable
from pydantic import BaseModel

from jobflow_cache.errors import SettingsError, UntrustedValueError
from jobflow_cache.settings import get_settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from jobflow_cache.settings import CacheSettings

__all__ = [
    "check_trusted",
    "class_problem",
    "group_key",
    "key_id",
    "sign",
    "signature_problem",
    "value_checks",
]

logger = logging.getLogger(__name__)


#: Standard-library classes monty rebuilds from plain data with a handler of its own.
_STDLIB_HANDLED = frozenset({("datetime", "datetime"), ("uuid", "UUID"), ("pathlib", "Path")})

#: Packages none of whose classes may be decoded from a store (rule 4)...
_DENIED_PACKAGES = ("fireworks", "jobflow_remote", "jobflow_cache")

#: ... but these (still subject to rule 5): cache_flow's mark of a job's function, whose
#: ``function`` is a nested ``"@callable"`` node (rule 6) and ``options`` plain JSON.
_OWN_DATA_CLASSES = frozenset({"jobflow_cache.marking.CachedFunction"})

#: Classes (by module and qualified name of a class in the MRO) that reach outside (rule 4).
_DENIED_BASES = frozenset(
    {
        "pydantic_settings.main.BaseSettings",
        "maggma.core.store.Store",
        "jobflow.core.store.JobStore",
        "jobflow.settings.JobflowSettings",
        # reads the POTCAR files its symbols name, below PMG_VASP_PSP_DIR
        "pymatgen.io.vasp.inputs.Potcar",
    }
)

#: Names (globals, attributes, imported names) whose presence in the code run while decoding a
#: class marks it a reader of files, the environment, the network or code (rule 5).
_READERS = frozenset(
    {
        "open",
        "zopen",
        "loadfn",
        "read_text",
        "read_bytes",
        "from_file",
        "environ",
        "getenv",
        "getenvb",
        "import_module",
        "__import__",
        "exec",
        "eval",
        "system",
        "popen",
        "Popen",
        "subprocess",
        "socket",
        "urlopen",
        "urllib",
        "requests",
        "MongoClient",
        "pymongo",
        "load_dotenv",
        "dotenv_values",
        "loadtxt",
        "genfromtxt",
        "fromfile",
        "read_csv",
        "read_json",
        "listdir",
        "scandir",
        "iterdir",
        "glob",
    }
)

#: Methods whose code the decoder runs for a class (besides pydantic's validators).
_DECODE_METHODS = ("from_dict", "__init__", "__new__", "__post_init__", "model_post_init")

#: Packages whose own code is the decoding machinery itself, not a class's.
_MACHINERY = frozenset(
    {"builtins", "pydantic", "pydantic_core", "monty", "typing", "abc", "dataclasses", "enum"}
)

#: How deep calls are followed from a decode method, and how many functions at most per class.
_SCAN_DEPTH = 3
_SCAN_BUDGET = 400

_TORCH_DTYPE = re.compile(r"torch\.(cuda\.)?[A-Za-z]+Tensor")


# -- rule 5, value-aware: decoders that read only through what the document says ----------
#: Types a gated field may never decode to: a file name (``isinstance(x, Path | str)``).
_NAME_TYPES: tuple[type, ...] = (str, bytes, os.PathLike, PurePath)


def _decodes_to_name(value: Any) -> str | None:
    """Why ``value`` (a field of a document) may decode to a file name, or None when it is
    None or a dict that stays a dict or is a document of a class that is no name type (an
    ``Incar``, a ``Kpoints``; its own node is checked by the walk like any other)."""
    if value is None:
        return None
    if type(value) is not dict:
        return f"it holds {type(value).__name__} {str(value)[:60]!r}"
    if "@callable" in value:
        return "it holds a function"
    if any(type(key) is not str or key.startswith("$") for key in value):
        # bson's JSON decoder turns {"$symbol": "..."} into a str, {"$binary": ...} into bytes
        return "it holds a document bson's decoder rebuilds"
    if "@module" not in value and "@class" not in value:
        return None  # a plain dict: monty decodes its values, the dict stays a dict
    module, name = value.get("@module"), value.get("@class")
    if not isinstance(module, str) or not isinstance(name, str):
        return "it holds a document that names no class"
    module, name = _redirected(module, name)
    found = _attribute(module, name.split("."))
    if not isinstance(found, type):
        return f"it holds a document of {module}.{name}, which is no class here"
    if issubclass(found, _NAME_TYPES):
        return f"it holds a {found.__name__}, a file name"
    return None


def _fields_hold_no_name(*fields: str) -> Callable[[dict[str, Any], type], str | None]:
    """A gate: ``fields`` of the node (or, when absent, the class's dataclass defaults) hold
    nothing the decoder would take as a file name."""

    def gate(node: dict[str, Any], cls: type) -> str | None:
        defaults = (
            {f.name: f.default for f in dataclasses.fields(cls)}
            if dataclasses.is_dataclass(cls)
            else {}
        )
        for field in fields:
            if field in node:
                why = _decodes_to_name(node[field])
            else:  # the constructor's default is used
                default = defaults.get(field, dataclasses.MISSING)
                why = None if default is None else f"its default is {default!r}"
            if why:
                return f"{field} names a file its decoding would read ({why})"
        return None

    gate.__doc__ = f"fields {', '.join(fields)} hold no str or Path"
    return gate


def _class_named_in(module: str, base: str) -> Callable[[dict[str, Any], type], str | None]:
    """A gate: the node's ``@class``, looked up in ``module`` (a fixed, installed module the
    reviewed ``from_dict`` imports by a constant name), is a subclass of ``module.base``
    whose own decoding passes rule 5."""

    def gate(node: dict[str, Any], cls: type) -> str | None:
        name = node.get("@class")
        owner = _attribute(module, [base])
        found = _attribute(module, [name]) if isinstance(name, str) else None
        if not (isinstance(found, type) and isinstance(owner, type) and issubclass(found, owner)):
            return f"its @class {name!r} is no {base} of {module}"
        if found is not cls:
            problem, gates = _verdict(found)
            if problem or gates:
                return f"it builds {found.__qualname__}: {problem or 'a gated class'}"
        return None

    gate.__doc__ = f"@class names a {base} of {module}"
    return gate


@dataclasses.dataclass(frozen=True)
class _Reviewed:
    """A decoding function read by hand: it names ``readers`` only to read what ``gate``
    checks in the document (or a fixed file of its own package). Excused only while its
    code reads the same names as when reviewed (``fingerprints``, see :func:`_fingerprint`)
    and only for classes with ``owner`` in their MRO."""

    owner: str
    readers: frozenset[str]
    fingerprints: frozenset[str]
    gate: Callable[[dict[str, Any], type], str | None] | None
    why: str


#: The reviewed decoders, by the module and qualified name of the function (rule 5's
#: value-aware exceptions). Reviewed against pymatgen 2026.10.24 on CPython 3.11.
_REVIEWED: dict[tuple[str, str], _Reviewed] = {
    ("pymatgen.io.vasp.sets", "VaspInputSet.__post_init__"): _Reviewed(
        owner="pymatgen.io.vasp.sets.VaspInputSet",
        readers=frozenset({"from_file", "loadfn"}),
        fingerprints=frozenset({"1939d753c30aae96"}),
        gate=_fields_hold_no_name("prev_incar", "prev_kpoints"),
        why="Incar/Kpoints.from_file only when prev_incar/prev_kpoints is a str or Path; "
        "loadfn of its own vdW_parameters.yaml (vdw is a key into it)",
    ),
    ("pymatgen.io.vasp.sets", "MPScanRelaxSet.__post_init__"): _Reviewed(
        owner="pymatgen.io.vasp.sets.MPScanRelaxSet",
        readers=frozenset({"loadfn"}),
        fingerprints=frozenset({"714c9e6b6d97dbbe"}),
        gate=None,
        why="loadfn of its own vdW_parameters.yaml (vdw is a key into it)",
    ),
    ("pymatgen.io.lammps.generators", "BaseLammpsSetGenerator.__post_init__"): _Reviewed(
        owner="pymatgen.io.lammps.generators.BaseLammpsSetGenerator",
        readers=frozenset({"from_file"}),
        fingerprints=frozenset({"096145485b396794"}),
        gate=None,
        why="LammpsInputFile.from_file of its own TEMPLATE_DIR/md.template or "
        "minimization.template (constants), only when inputfile is None",
    ),
    ("pymatgen.core.structure_matcher", "AbstractComparator.from_dict"): _Reviewed(
        owner="pymatgen.core.structure_matcher.AbstractComparator",
        readers=frozenset({"__import__"}),
        fingerprints=frozenset({"9760e71d5c08f5f9"}),
        gate=_class_named_in("pymatgen.core.structure_matcher", "AbstractComparator"),
        why="__import__ of the constant pymatgen.core.structure_matcher (a module, so its "
        "fromlist imports nothing), then calls the class the document's @class names there",
    ),
    ("pymatgen.core.molecule_matcher", "AbstractMolAtomMapper.from_dict"): _Reviewed(
        owner="pymatgen.core.molecule_matcher.AbstractMolAtomMapper",
        readers=frozenset({"__import__"}),
        fingerprints=frozenset({"a607f922f2b67944"}),
        gate=_class_named_in("pymatgen.core.molecule_matcher", "AbstractMolAtomMapper"),
        why="__import__ of the constant pymatgen.core.molecule_matcher (a module), then "
        "the from_dict of the class the document's @class names there",
    ),
}


def _fingerprint(code: types.CodeType) -> str:
    """What the names a function's code reads come to (a change of its code that reads
    anything new changes it)."""
    return hashlib.sha256(" ".join(sorted(_code_names(code))).encode()).hexdigest()[:16]


def _trusted_prefixes() -> tuple[str, ...]:
    return tuple(get_settings().TRUSTED_MODULES)


def _is_trusted(module: str, trusted: tuple[str, ...]) -> bool:
    return any(
        prefix == "*" or module == prefix or module.startswith(prefix + ".") for prefix in trusted
    )


@functools.cache
def _installed_packages() -> frozenset[str]:
    """Top-level import names of the installed distributions (read once per process)."""
    return frozenset(metadata.packages_distributions())


def _is_stdlib(module: str) -> bool:
    return module.partition(".")[0] in sys.stdlib_module_names


def _check_module(module: str, trusted: tuple[str, ...]) -> bool:
    """Rule 1: refuse to import ``module`` unless it is imported already, belongs to an
    imported or installed package (not the standard library), is trusted, or does not exist
    at all (then return False: that may change).

    A module that is neither could be any file on ``sys.path`` (a script in the working
    folder, say), and importing a module runs its code.
    """
    if module in sys.modules or _is_trusted(module, trusted):
        return True
    top = module.partition(".")[0]
    if top in sys.modules:
        return True
    if top in _installed_packages() and top not in sys.stdlib_module_names:
        return True
    try:
        if importlib.util.find_spec(top) is None:  # finds without running anything
            return False  # no such module: monty leaves the value as data
    except (ImportError, ValueError):
        pass
    raise UntrustedValueError(
        f"a cached value names the module {module!r}, which is neither imported nor installed "
        "here (trust it with JOBFLOW_CACHE_TRUSTED_MODULES)"
    )


def _attribute(module: str, path: list[str]) -> Any:
    """``module.<path>`` (imported if needed), or None when it does not exist."""
    try:
        found: Any = importlib.import_module(module)
        for name in path:
            found = getattr(found, name)
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    return found


def _attribute_of(obj: Any, path: list[str]) -> Any:
    try:
        for name in path:
            obj = getattr(obj, name)
    except AttributeError:
        return None
    return obj


# -- rule 5: what the decoder runs for a class ---------------------------------------------
def _function_of(obj: Any) -> types.FunctionType | None:
    """The Python function behind ``obj`` (a method, classmethod, staticmethod, decorated
    function), or None for builtins and other callables."""
    for _ in range(8):
        if isinstance(obj, (classmethod, staticmethod, types.MethodType)):
            obj = obj.__func__
        elif isinstance(obj, functools.partial):
            obj = obj.func
        elif hasattr(obj, "__wrapped__") and not isinstance(obj, types.FunctionType):
            obj = obj.__wrapped__
        else:
            break
    return obj if isinstance(obj, types.FunctionType) else None


def _is_machinery(module: str | None) -> bool:
    return not module or module.partition(".")[0] in _MACHINERY


#: Instructions that read a name (a store, ``self.socket = socket``, reads nothing).
_LOADS = frozenset(
    {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_ATTR", "LOAD_METHOD", "IMPORT_NAME", "IMPORT_FROM"}
)


@functools.lru_cache(maxsize=4096)
def _code_names(code: types.CodeType) -> frozenset[str]:
    """Global, attribute and imported names read by ``code`` and the code nested in it."""
    names: set[str] = set()
    for ins in dis.get_instructions(code):
        if ins.opname in _LOADS and isinstance(ins.argval, str):
            names.update(ins.argval.split("."))  # import a.b: both a and b
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return frozenset(names)


@functools.lru_cache(maxsize=4096)
def _code_stores(code: types.CodeType) -> frozenset[str]:
    """Attribute names ``code`` (and the code nested in it) assigns: ``self.x = ...`` runs the
    setter of a property ``x``."""
    names = {
        ins.argval
        for ins in dis.get_instructions(code)
        if ins.opname == "STORE_ATTR" and isinstance(ins.argval, str)
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_stores(const)
    return frozenset(names)


def _accessors(found: Any, stored: bool) -> list[Any]:
    """The code run by reading (a method, a property's getter, a cached property's function)
    or, when ``stored``, by setting (a property's setter) the class attribute ``found``."""
    if isinstance(found, property):
        return [found.fset] if stored else [found.fget]
    if isinstance(found, functools.cached_property):
        return [] if stored else [found.func]
    return [] if stored else [found]


class _Scan:
    """Rule 5 for one class: follows the code its decoding runs, a few calls deep."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.seen: set[types.CodeType] = set()
        self.budget = _SCAN_BUDGET
        self.owners = {f"{base.__module__}.{base.__qualname__}" for base in cls.__mro__}
        #: the value checks of the reviewed functions met (see _REVIEWED)
        self.gates: dict[str, Callable[[dict[str, Any], type], str | None]] = {}

    def excused(self, func: types.FunctionType, readers: set[str]) -> tuple[set[str], str]:
        """The readers of ``func`` left once a reviewed function's are excused (recording
        its gate), and a note when a reviewed function's code has changed since."""
        entry = _REVIEWED.get((func.__module__ or "", func.__qualname__))
        if entry is None or entry.owner not in self.owners:
            return readers, ""
        if _fingerprint(func.__code__) not in entry.fingerprints:
            return readers, " (its code changed since it was reviewed)"
        if entry.gate is not None:
            self.gates[f"{func.__module__}.{func.__qualname__}"] = entry.gate
        return readers - entry.readers, ""

    def function(self, func: types.FunctionType, depth: int, where: str) -> str | None:
        code = func.__code__
        if code in self.seen or self.budget <= 0 or _is_machinery(func.__module__):
            return None
        self.seen.add(code)
        self.budget -= 1
        names = _code_names(code)
        readers, note = self.excused(func, set(names & _READERS))
        if readers:
            return f"{where} uses {', '.join(sorted(readers))}{note}"
        if depth >= _SCAN_DEPTH:
            return None
        # the functions it calls by name: module globals, and the class's own methods, every
        # definition along the MRO (``super().__post_init__()`` runs the base class's too)
        namespace = getattr(func, "__globals__", {})
        stores = _code_stores(code)
        for name in sorted(names | stores):
            callees = [namespace.get(name)] if name in names else [None]
            if callees[0] is None:  # methods and properties (read or set) along the MRO
                callees = []
                for base in self.cls.__mro__:
                    found = base.__dict__.get(name)
                    if name in names:
                        callees += _accessors(found, stored=False)
                    if name in stores:
                        callees += _accessors(found, stored=True)
            for callee in callees:
                target = _function_of(callee)
                if target is None:
                    continue  # a class it builds is checked when a document names it
                if not _is_stdlib(target.__module__ or ""):
                    found = self.function(target, depth + 1, f"{where} -> {name}")
                    if found:
                        return found
        return None


def _validator_functions(cls: type) -> list[tuple[str, Any]]:
    """The pydantic validators (field, model, root) of ``cls``: (name, function) pairs."""
    decorators = getattr(cls, "__pydantic_decorators__", None)
    if decorators is None:
        return []
    found: list[tuple[str, Any]] = []
    for group in ("validators", "field_validators", "root_validators", "model_validators"):
        for name, decorator in getattr(decorators, group, {}).items():
            found.append((name, getattr(decorator, "func", None)))
    return found


def _annotation_classes(annotation: Any, out: set[type]) -> None:
    """Classes named by a type annotation (through Optional, list[...], dict[...], ...)."""
    if isinstance(annotation, type):
        out.add(annotation)
    for arg in typing.get_args(annotation):
        _annotation_classes(arg, out)


def _field_classes(cls: type) -> set[type]:
    """Models and dataclasses pydantic builds from plain dicts for the fields of ``cls``."""
    out: set[type] = set()
    fields = getattr(cls, "model_fields", None)
    if isinstance(fields, dict):
        for info in fields.values():
            _annotation_classes(getattr(info, "annotation", None), out)
    return {c for c in out if c is not cls and (issubclass(c, BaseModel) or _is_dataclass(c))}


def _is_dataclass(cls: type) -> bool:
    return dataclasses.is_dataclass(cls)


_Gates = tuple[tuple[str, "Callable[[dict[str, Any], type], str | None]"], ...]
_CLASS_VERDICTS: dict[type, tuple[str | None, _Gates]] = {}


def class_problem(cls: type) -> str | None:
    """Why decoding ``cls`` from a store is refused (rules 2, 4 and 5), or None (for a class
    with :func:`value_checks`, a document of it is still checked by them).

    Examples
    --------
    >>> from jobflow.settings import JobflowSettings
    >>> print(class_problem(JobflowSettings))
    jobflow.settings.JobflowSettings reaches outside the document (it is a JobflowSettings)
    >>> from pymatgen.core import Structure
    >>> print(class_problem(Structure))
    None
    """
    return _verdict(cls)[0]


def value_checks(cls: type) -> list[str]:
    """What a document of ``cls`` must hold to be decoded (rule 5's reviewed decoders,
    :data:`_REVIEWED`), one line each; empty for a class decoded whatever its fields hold.

    Examples
    --------
    >>> from pymatgen.io.vasp.sets import MPRelaxSet
    >>> [line.partition(": ")[2] for line in value_checks(MPRelaxSet)]
    ['fields prev_incar, prev_kpoints hold no str or Path']
    """
    return [f"{where}: {gate.__doc__}" for where, gate in _verdict(cls)[1]]


def _verdict(cls: type) -> tuple[str | None, _Gates]:
    if cls in _CLASS_VERDICTS:
        return _CLASS_VERDICTS[cls]
    _CLASS_VERDICTS[cls] = (None, ())  # a field typed with its own class: no endless recursion
    verdict = _class_problem(cls)
    if len(_CLASS_VERDICTS) > 10_000:
        _CLASS_VERDICTS.clear()
    _CLASS_VERDICTS[cls] = verdict
    return verdict


def _class_problem(cls: type) -> tuple[str | None, _Gates]:
    problem, scan = _class_scan(cls)
    return problem, () if problem else tuple(sorted(scan.gates.items())) if scan else ()


def _class_scan(cls: type) -> tuple[str | None, _Scan | None]:
    name = f"{cls.__module__}.{cls.__qualname__}"
    module = cls.__module__ or ""
    if issubclass(cls, Enum):
        return None, None  # a member is looked up by value
    if _is_stdlib(module):
        return f"{name} is a standard-library class monty has no plain-data handler for", None
    if module.partition(".")[0] in _DENIED_PACKAGES and name not in _OWN_DATA_CLASSES:
        return f"{name} is from a package whose classes are never decoded from a store", None
    for base in cls.__mro__:
        qualified = f"{base.__module__}.{base.__qualname__}"
        if qualified in _DENIED_BASES:
            return f"{name} reaches outside the document (it is a {base.__name__})", None
    scan = _Scan(cls)
    for method in _DECODE_METHODS:
        func = _function_of(inspect.getattr_static(cls, method, None))
        if func is not None:
            found = scan.function(func, 0, f"{name}.{method}")
            if found:
                return f"decoding {name} may read outside the document: {found}", scan
    for vname, vfunc in _validator_functions(cls):
        func = _function_of(vfunc)
        if func is not None:
            found = scan.function(func, 0, f"{name} validator {vname}")
            if found:
                return f"decoding {name} may read outside the document: {found}", scan
    for field_class in sorted(_field_classes(cls), key=lambda c: c.__qualname__):
        inner, gates = _verdict(field_class)
        if inner:
            return f"{name} has a field of type {field_class.__qualname__}: {inner}", scan
        if gates:  # pydantic builds it from a plain dict the walk does not see as a node
            return (
                f"{name} has a field of type {field_class.__qualname__}, whose decoding "
                "reads a file its document may name",
                scan,
            )
    return None, scan


# -- the walk ------------------------------------------------------------------------------
def _callable_allowed(found: Any) -> bool:
    """Rule 6: a jobflow job function (or Maker method, or a cache_flow wrapper of one), or a
    class passing rules 2, 4 and 5 (an output schema)."""
    if isinstance(found, type):
        return issubclass(found, (BaseModel, MSONable)) and class_problem(found) is None
    original = getattr(found, "original", None)
    if original is None or not callable(found):
        return False
    if type(found).__module__ == "jobflow_cache.marking":  # CachedFunction: its inner one
        return _callable_allowed(original) or _function_of(original) is not None
    # made by jobflow's @job (or @cached_job): a plain function with the job's own function
    return isinstance(found, types.FunctionType) and _function_of(original) is not None


#: What nodes were found safe, by (module, @class or @callable, name, bound module, bound
#: class): checking a Job's function once serves its 10,000 copies in a dynamic response.
_SAFE: set[tuple[Any, ...]] = set()


def _redirected(module: str, name: str) -> tuple[str, str]:
    """Where ``~/.monty.yaml`` sends (module, class), as monty's decoder would."""
    try:
        target = MSONable.REDIRECT.get(module, {}).get(name)
    except Exception:  # an unreadable redirect file: monty fails the same way
        return module, name
    if isinstance(target, dict) and isinstance(target.get("@module"), str):
        return target["@module"], str(target.get("@class", name))
    return module, name


def _check_handled(node: dict[str, Any], module: str, name: str, trusted: tuple[str, ...]) -> bool:
    """Rule 3 for monty's handlers of third-party types; True when ``node`` is one."""
    if module == "pandas" and name in ("DataFrame", "Series"):
        data = node.get("data")
        if not isinstance(data, str):
            raise UntrustedValueError("a cached pandas value whose data is not JSON text")
        try:
            inner = json.loads(data)
        except ValueError as err:
            raise UntrustedValueError(f"a cached pandas value holds no JSON: {err}") from err
        _walk(inner, trusted)  # monty decodes this text with a decoder of its own
        return True
    if module == "torch" and name == "Tensor":
        dtype = node.get("dtype")
        if not isinstance(dtype, str) or not _TORCH_DTYPE.fullmatch(dtype):
            raise UntrustedValueError(f"a cached torch tensor of dtype {dtype!r}")
        return True
    return (module, name) in _STDLIB_HANDLED or (module, name) in {
        ("numpy", "array"),
        ("pint", "Quantity"),
        ("bson.objectid", "ObjectId"),
        ("bson.dbref", "DBRef"),
    }


def _check_node(node: dict[str, Any], trusted: tuple[str, ...]) -> None:
    module = node["@module"]
    if not isinstance(module, str) or ("@class" not in node and "@callable" not in node):
        return  # monty leaves it as data (or fails to decode it)
    kind = "@class" if "@class" in node else "@callable"
    name, bound = node[kind], node.get("@bound") if kind == "@callable" else None
    bound_of = (bound.get("@module"), bound.get("@class")) if type(bound) is dict else (None,)
    key = (module, kind, name, *bound_of) if isinstance(name, str) else None
    if key in _SAFE:  # never a handler's node: those are checked each time (their data)
        return
    if kind == "@class" and isinstance(name, str):
        module, name = _redirected(module, name)
        if _is_trusted(module, trusted):
            return
        if _check_handled(node, module, name, trusted):
            return  # the handlers' modules are installed ones, imported by monty's handler
    if _is_trusted(module, trusted):
        return
    if kind == "@class" and _is_stdlib(module):
        # rule 2: nothing from the standard library but what monty's handlers rebuild, and
        # Enum members of modules imported already
        loaded = sys.modules.get(module)  # (rule 1 refuses to import one)
        found = _attribute_of(loaded, name.split(".")) if loaded is not None else None
        if loaded is None:
            _check_module(module, trusted)
            return  # no such module: monty leaves the value as data
        if isinstance(found, type) and (issubclass(found, Enum) or _left_as_data(found)):
            return
        raise UntrustedValueError(
            f"a cached value names {module}.{name}, a standard-library class that is not data"
        )
    cacheable = _check_module(module, trusted)
    if not isinstance(name, str):
        return  # monty fails to decode it
    if kind == "@class":
        found = _attribute(module, name.split("."))
        if isinstance(found, type):
            problem, gates = _verdict(found)
            if problem:
                raise UntrustedValueError(f"a cached value names a class it may not: {problem}")
            for where, gate in gates:  # rule 5, value-aware: this document's own fields
                problem = gate(node, found)
                if problem:
                    raise UntrustedValueError(
                        f"a cached value holds a {module}.{name} that {where} would read a "
                        f"file for: {problem}"
                    )
            cacheable = cacheable and not gates  # its verdict is this document's
        elif callable(getattr(found, "from_dict", None)):
            # monty would call it; a class's from_dict builds an instance, this is no class
            raise UntrustedValueError(f"a cached value names {module}.{name}, not a class")
    else:
        if bound is None:
            found = _attribute(module, name.split("."))
        elif type(bound) is dict and isinstance(bound.get("@module"), str):
            # a method of a serialized object (a Maker's make): its class's attribute; the
            # bound object itself is a node of the walk
            cacheable = _check_module(bound["@module"], trusted) and cacheable
            owner = bound.get("@class")
            cls = _attribute(bound["@module"], owner.split(".")) if isinstance(owner, str) else None
            found = _attribute_of(cls, name.split(".")[1:])
        else:
            found = bound  # not an object monty can rebuild: refused below
        if found is not None and not _callable_allowed(found):
            raise UntrustedValueError(
                f"a cached value holds the function {module}:{name}, which is not a jobflow "
                "job (trust it with JOBFLOW_CACHE_TRUSTED_MODULES)"
            )
    if cacheable and key is not None and len(_SAFE) < 100_000:
        _SAFE.add(key)


def _left_as_data(cls: type) -> bool:
    """Whether monty leaves a document naming ``cls`` as the dict it is (calls nothing)."""
    return not (
        hasattr(cls, "from_dict") or issubclass(cls, BaseModel) or dataclasses.is_dataclass(cls)
    )


#: The fields of a jobflow ``Job`` document that are its constructor's own arguments; any
#: other field is a ``**kwargs`` entry naming what to save in an additional store.
_JOB_FIELDS = frozenset(
    {
        "@module",
        "@class",
        "@version",
        "function",
        "function_args",
        "function_kwargs",
        "output_schema",
        "uuid",
        "index",
        "name",
        "metadata",
        "config",
        "hosts",
        "metadata_updates",
        "config_updates",
        "name_updates",
    }
)


def _is_type_reference(node: Any) -> bool:
    return (
        type(node) is dict
        and node.keys() <= {"@module", "@callable", "@bound"}
        and node.get("@bound") is None
        and isinstance(node.get("@module"), str)
        and isinstance(node.get("@callable"), str)
    )


def _job_values(node: dict[str, Any], trusted: tuple[str, ...]) -> list[Any]:
    """The values of a jobflow ``Job`` document left to walk once its additional-store
    ``**kwargs`` (``data=[Wavecar, BandStructure, "force_constants"]`` on every atomate2
    VASP job) are checked.

    Rule 6, by place: there a ``"@callable"`` naming a class is a *type to look for* —
    jobflow passes these kwargs only to ``JobStore.update(save=...)``, whose ``find_key``
    compares an MSONable class's ``__module__`` and ``__name__`` with the output's documents
    (and other keys by equality): the class is never called. So such a class need not pass
    rules 2-5 (``Wavecar`` reads its file when called); it must be a class of an installed,
    non-standard-library module (rule 1) with no ``@bound`` object."""
    rest: list[Any] = []
    for key, value in node.items():
        if key in _JOB_FIELDS:
            rest.append(value)
            continue
        items = value if type(value) is list else [value]
        for item in items:
            if _is_type_reference(item):
                _check_type_reference(item, trusted)
            else:
                rest.append(item)
    return rest


def _check_type_reference(node: dict[str, Any], trusted: tuple[str, ...]) -> None:
    module, name = node["@module"], node["@callable"]
    if _is_trusted(module, trusted) or ("type", module, name) in _SAFE:
        return
    if _is_stdlib(module):
        raise UntrustedValueError(f"a cached job saves data by the standard-library {name}")
    if not _check_module(module, trusted):
        return  # no such module: monty leaves the value as data
    found = _attribute(module, name.split("."))
    if found is not None and not isinstance(found, type):
        raise UntrustedValueError(
            f"a cached job saves data by {module}:{name}, which is neither a class nor a key"
        )
    if found is not None and len(_SAFE) < 100_000:
        _SAFE.add(("type", module, name))


def _walk(tree: Any, trusted: tuple[str, ...]) -> None:
    pending = [tree]
    pop, push = pending.pop, pending.append
    while pending:
        node = pop()
        if type(node) is dict:
            values: Any = node.values()
            if "@module" in node:
                _check_node(node, trusted)
                if (node["@module"], node.get("@class")) == ("jobflow.core.job", "Job"):
                    values = _job_values(node, trusted)
        elif type(node) is list:
            values = node
        else:
            continue
        for value in values:
            kind = type(value)
            if kind is dict or kind is list:
                push(value)


def check_trusted(tree: Any) -> None:
    """Check every document node of a parsed cached value before monty's decoder rebuilds it
    (the rule is in this module's docstring). Raises :class:`UntrustedValueError`.

    Examples
    --------
    >>> check_trusted({"structure": {"@module": "pymatgen.core", "@class": "Structure"}})
    >>> try:
    ...     check_trusted([{"@module": "os", "@callable": "system", "@bound": None}])
    ... except UntrustedValueError as err:
    ...     print(str(err)[:50])
    a cached value holds the function os:system, which
    >>> try:
    ...     check_trusted({"x": [{"@module": "jobflow.settings", "@class": "JobflowSettings",
    ...                           "CONFIG_FILE": "payload.yaml"}]})
    ... except UntrustedValueError as err:
    ...     print(str(err)[:60])
    a cached value names a class it may not: jobflow.settings.Jo
    """
    _walk(tree, _trusted_prefixes())


# -- signed entries ------------------------------------------------------------------------
#: Form of an entry's signature: ``hmac-sha256:<key id>:<hex>``.
SIGNATURE_SCHEME = "hmac-sha256"

#: Shortest group key accepted (bytes).
MIN_KEY_SIZE = 16


def group_key(settings: CacheSettings) -> bytes | None:
    """The group key of ``settings`` (``GROUP_KEY``, else the content of ``GROUP_KEY_FILE``,
    surrounding whitespace stripped), or None when neither is set. Raises
    :class:`.SettingsError` when the file cannot be read or the key is shorter than
    :data:`MIN_KEY_SIZE` bytes: a cache told to check signatures never runs without them.
    """
    if settings.GROUP_KEY is not None:
        key = settings.GROUP_KEY.get_secret_value().strip().encode()
        origin = "JOBFLOW_CACHE_GROUP_KEY"
    elif settings.GROUP_KEY_FILE is not None:
        path = Path(settings.GROUP_KEY_FILE).expanduser()
        origin = f"JOBFLOW_CACHE_GROUP_KEY_FILE ({path})"
        try:
            key = path.read_bytes().strip()
        except OSError as err:
            raise SettingsError(f"cannot read the group key: {origin}: {err}") from err
    else:
        return None
    if len(key) < MIN_KEY_SIZE:
        raise SettingsError(
            f"the group key of {origin} has {len(key)} bytes; at least {MIN_KEY_SIZE} are needed"
        )
    return key


def key_id(key: bytes) -> str:
    """A short public name of ``key`` (so a reader tells "signed with another key" from
    "altered"); it reveals nothing usable about the key.

    Examples
    --------
    >>> key_id(b"0123456789abcdef")
    '564236456c42'
    """
    return hashlib.sha256(b"jobflow-cache group key id\0" + key).hexdigest()[:12]


def _mac(key: bytes, digest: str, checksum: str) -> str:
    message = b"jobflow-cache entry v1\0" + digest.encode() + b"\0" + checksum.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(key: bytes, digest: str, checksum: str) -> str:
    """The signature of an entry: an HMAC-SHA256 over its digest and checksum (so it cannot
    be moved to another digest), with the id of the key.

    Examples
    --------
    >>> key = b"0123456789abcdef"
    >>> signature = sign(key, "d" * 32, "c" * 32)
    >>> signature.startswith("hmac-sha256:" + key_id(key) + ":")
    True
    >>> signature_problem(key, "d" * 32, "c" * 32, signature) is None
    True
    >>> signature_problem(key, "e" * 32, "c" * 32, signature)
    'its signature does not match (entry altered, or moved from another digest)'
    """
    return f"{SIGNATURE_SCHEME}:{key_id(key)}:{_mac(key, digest, checksum)}"


def signature_problem(key: bytes, digest: str, checksum: str, signature: Any) -> str | None:
    """Why an entry's ``signature`` does not prove it was written by a holder of ``key`` for
    this digest and checksum, or None when it does."""
    if not isinstance(signature, str) or not signature:
        return "it is not signed, and this cache requires entries signed with the group key"
    scheme, _, rest = signature.partition(":")
    kid, _, mac = rest.partition(":")
    if scheme != SIGNATURE_SCHEME or not kid or not mac:
        return "its signature is of an unknown form"
    if kid != key_id(key):
        return f"it is signed with another group key (key id {kid[:12]!r}, not {key_id(key)!r})"
    if not hmac.compare_digest(mac, _mac(key, digest, checksum)):
        return "its signature does not match (entry altered, or moved from another digest)"
    return None
