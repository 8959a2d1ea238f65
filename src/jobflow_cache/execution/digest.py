"""A job call's digest: its function's code, its resolved arguments and what they name.

:func:`digest_of` is the one hashing path of the execution core (:meth:`.Cache.digest` and
:meth:`.Cache.call`): the function's import path, its arguments bound to its signature (the
``ignore`` option's left out), the cache version slot (the ``cache_version`` option, the code
of user functions and classes, the ``env`` option's environment variables, dict keys that
name paths or jobs) and the arguments' canonical trees, in which strings naming upstream jobs
and run folders become their owners' digests (:meth:`.Lineage.normalizer`).

Contract: the digest depends on nothing else (not on this process's uuids or folders); a call
whose arguments do not fit the signature raises :class:`CallMismatchError` (the call itself
raises jobflow's error); any other failure propagates (the job runs uncached).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from jobflow_cache.errors import CallMismatchError
from jobflow_cache.execution.call import Refs
from jobflow_cache.execution.lineage import Lineage
from jobflow_cache.execution.options import JobOptions
from jobflow_cache.hashing import code as codeversion
from jobflow_cache.hashing import contents
from jobflow_cache.hashing.canonical import (
    CallDigest,
    Normalizer,
    bind_arguments,
    digest_call,
    digest_value,
    function_path,
)

__all__ = ["digest_of"]


def digest_of(
    function: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    options: JobOptions,
    refs: Refs,
    lineage: Lineage,
    digest_env: Any = None,
) -> CallDigest:
    """Digest of calling the (unbound) ``function`` with resolved ``args``/``kwargs``.

    For a method, ``args[0]`` is the instance (e.g. the Maker), whose fields are hashed.
    ``refs`` collects the upstream jobs and run folders the arguments name; ``digest_env``
    is the ``DIGEST_ENV`` setting.
    """
    path = function_path(function)
    try:
        arguments = bind_arguments(function, args, kwargs, ignore=options.ignore)
    except TypeError as err:
        raise CallMismatchError(str(err)) from err
    # user code (not installed packages) counts by its source, see jobflow_cache.hashing.code
    instance = codeversion.instance_type(function, args)
    code = codeversion.job_code(function, instance, versioned=options.cache_version is not None)
    env = codeversion.env_part(codeversion.env_names(options.env, digest_env))
    normalize: Normalizer | None
    if _holds_no_str(arguments.values()):
        # no str for the hook to see (the same digest without it): no folder listing for
        # bare names, no path, no uuid
        contents.use_database(lineage.contents_db)
        normalize = None
    else:
        normalize = lineage.normalizer(refs)
    # dict keys never reach the hashing hook: keys naming files, folders or upstream jobs
    # ({"/data/POTCAR": "potcar"}) count through the slot, by what the hook makes of them
    keys = _str_keys(arguments.values())
    if keys and normalize is None:
        normalize = lineage.normalizer(refs)
    keyed = _keyed(keys, normalize)
    version = _with_keys(
        codeversion.cache_version_slot(options.cache_version, code, env=env), keyed
    )
    call = digest_call(path, arguments, cache_version=version, normalize_str=normalize)
    named = codeversion.argument_code(call.encodings, call.arg_digests, instance)
    if named is not None:  # user functions or classes in the arguments: their code too
        version = _with_keys(
            codeversion.cache_version_slot(options.cache_version, code, named, env), keyed
        )
        call = digest_call(path, arguments, cache_version=version, normalize_str=normalize)
    return call


#: Values :func:`_holds_no_str` looks at before it gives up (and says a str may be there).
_NO_STR_BUDGET = 64


def _holds_no_str(values: Iterable[Any]) -> bool:
    """True when ``values`` are only numbers, bools, None and lists, tuples and dicts of them
    (dict keys aside: hashing never normalises them), so that no str reaches a hashing hook;
    False when a str or any other object may be there, or after :data:`_NO_STR_BUDGET` items.

    Examples
    --------
    >>> _holds_no_str([1, 2.0, None, [True, (3,)], {"a": 4}]), _holds_no_str([[1, "x"]])
    (True, False)
    """
    stack = list(values)
    budget = _NO_STR_BUDGET
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is int or kind is float or kind is bool or value is None:
            continue
        if kind is list or kind is tuple or kind is dict:
            budget -= len(value)
            if budget < 0:
                return False
            stack.extend(value.values() if kind is dict else value)
            continue
        return False
    return True


def _str_keys(values: Iterable[Any]) -> list[str]:
    """The str keys of the plain dicts in ``values`` (nested in lists, tuples and dicts), at
    most :data:`_NO_STR_BUDGET` times 16 items looked at.

    Examples
    --------
    >>> sorted(_str_keys([{"/a": 1, "b": [{"c": 2}]}, (3, "x")]))
    ['/a', 'b', 'c']
    """
    keys: list[str] = []
    stack = list(values)
    budget = _NO_STR_BUDGET * 16
    while stack and budget > 0:
        value = stack.pop()
        kind = type(value)
        if kind is dict:
            budget -= len(value)
            keys.extend(k for k in value if type(k) is str)
            stack.extend(value.values())
        elif kind is list or kind is tuple:
            budget -= len(value)
            stack.extend(value)
    return keys


def _keyed(keys: list[str], normalize: Normalizer | None) -> list[list[Any]]:
    """``[key, node]`` for each key the hashing hook replaces (a path, an upstream uuid)."""
    if normalize is None:
        return []
    found = []
    for key in dict.fromkeys(keys):
        node = normalize(key)
        if node is not None:
            found.append([key, node])
    return sorted(found, key=lambda pair: pair[0])


def _with_keys(version: str | None, keyed: list[list[Any]]) -> str | None:
    """The cache_version slot with the dict keys that name paths or jobs, when there are."""
    if not keyed:
        return version
    return f"{version or ''}|keys:{digest_value(keyed)}"
