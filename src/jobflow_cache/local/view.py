"""An indexed view of a run's ``MemoryStore`` s: queries by this run's uuids answered from an
index of the documents the run wrote, instead of by mongomock's scan of the whole collection.

A maggma ``MemoryStore`` is a mongomock collection, which answers every query and upsert by
testing each document it holds against the filter, so jobflow's loop over n jobs costs O(n²)
(see :mod:`.local.manager`). :func:`indexed_view` gives ``Job.run`` a shallow copy of a plain
``JobStore`` whose ``MemoryStore`` s are :class:`IndexedMemoryStore` views: the same documents
are written to the same collections, and a query naming one of this run's job (or blob) uuids
is answered from the index, with mongomock's own filter and sort functions. Uuids already in
the store before the run are loaded from it once; any other query, and any other store type,
goes to the store itself.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

from bson import ObjectId
from jobflow import JobStore
from maggma.core import Sort
from maggma.stores import MemoryStore
from mongomock_ng.filtering import filter_applies, resolve_sort_key
from mongomock_ng.helpers import patch_datetime_awareness_in_document
from monty.json import jsanitize

if TYPE_CHECKING:
    from maggma.core import Store

__all__ = ["IndexedMemoryStore", "indexed_view"]


def indexed_view(store: JobStore) -> JobStore:
    """``store``, or a shallow copy whose ``MemoryStore`` s are indexed by this run's uuids.

    Only a plain ``JobStore`` on plain ``MemoryStore`` s gets a view: other store types answer
    queries themselves (a MongoDB server uses its indexes), and subclasses may use their stores
    in ways the view does not know.
    """
    if type(store) is not JobStore or type(store.docs_store) is not MemoryStore:
        return store
    additional: dict[str, Any] = store.additional_stores  # type: ignore[has-type]
    stores = [store.docs_store, *additional.values()]
    if len({id(s) for s in stores}) != len(stores):
        return store  # one collection seen under two keys: leave it alone
    view = JobStore.__new__(JobStore)  # copy.copy would round-trip the stores through as_dict
    vars(view).update(vars(store))
    view.docs_store = cast("Store", IndexedMemoryStore(store.docs_store, "uuid"))
    if type(additional) is dict:  # a defaultdict makes stores on demand: keep it
        view.additional_stores = {  # type: ignore[has-type]
            name: cast("Store", IndexedMemoryStore(s, "blob_uuid")) if type(s) is MemoryStore else s
            for name, s in additional.items()
        }
    return view


class IndexedMemoryStore:
    """A ``MemoryStore`` seen through an index of the documents this run writes into it.

    ``field`` is the uuid that groups documents (``uuid`` for jobs, ``blob_uuid`` for blobs).
    Writes land in the store's collection exactly as ``MemoryStore.update`` would leave them: a
    document whose key is not in the collection is inserted (the upsert would insert the same
    document, without first scanning the collection for it); anything else goes to
    ``MemoryStore.update``. The index keeps, for each ``field`` value written by this run, the
    documents as the collection holds them, in collection order.

    A query whose filter requires ``field`` to equal such a value (or to be ``$in`` a list of
    them) is answered from those documents with mongomock's own ``filter_applies`` and
    ``resolve_sort_key``, the way mongomock's ``find`` would answer it, so the result is the
    same without a scan. Any other query goes to the store. Values present in the collection
    before the run are loaded into the index with one query the first time they are needed.

    Assumed, as jobflow itself does: while the run goes on, nothing else writes documents of
    this run's uuids into the collection. The index holds its own copy of this run's documents
    (mongomock keeps another), for the duration of the run.
    """

    def __init__(self, store: MemoryStore, field: str) -> None:
        self.store = store
        self.field = field
        self._collection = store._collection
        options = self._collection.codec_options
        self._usable = not options.tz_aware and options.document_class is dict
        self._groups: dict[str, list[dict[str, Any]]] = {}
        # values already in the collection, and the position of each document (its order)
        self._present: dict[str, None] = {}
        self._position: dict[Any, int] = {}
        self._count = 0
        if self._usable and self._collection.estimated_document_count():
            for doc in self._collection.find({}, {field: 1}):
                value = doc.get(field)
                if not isinstance(value, str):
                    self._usable = False  # an array or a missing uuid: matching gets subtle
                    break
                self._present[value] = None
                self._position[doc["_id"]] = self._count
                self._count += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    # -- writing --------------------------------------------------------------------------------
    def update(
        self, docs: list[dict[str, Any]] | dict[str, Any], key: list | str | None = None
    ) -> None:
        """``MemoryStore.update``: insert the new documents, upsert the others."""
        listed = docs if isinstance(docs, list) else [docs]
        key = key or self.store.key
        fields = key if isinstance(key, list) else [key]
        if not self._usable or self.store.validator is not None or self.field not in fields:
            return self._delegate_update(listed, key)
        sanitized = [jsanitize(x, allow_bson=True, recursive_msonable=True) for x in listed]
        if not all(_insertable(d, fields, self.field) for d in sanitized):
            return self._delegate_update(listed, key)
        for original, doc in zip(listed, sanitized):
            group = self._group(doc[self.field], adopt=True)
            search = {k: doc[k] for k in fields}
            if group is None or any(filter_applies(search, stored) for stored in group):
                self._delegate_update([original], key)  # a replacement: mongomock's own
                continue
            stored = {"_id": ObjectId(), **doc}
            try:
                self._collection.insert_one(stored)
            except Exception:  # the upsert raises the same error, or copes: let it
                self._delegate_update([original], key)
                continue
            self._position[stored["_id"]] = self._count
            self._count += 1
            group.append(patch_datetime_awareness_in_document(stored))
        return None

    def remove_docs(self, criteria: dict[str, Any]) -> None:
        """``MemoryStore.remove_docs``; the index is dropped (every later query is the store's)."""
        self._usable = False
        self.store.remove_docs(criteria)

    def _delegate_update(self, docs: list[dict[str, Any]], key: list | str | None) -> None:
        for doc in docs:
            value = doc.get(self.field) if isinstance(doc, Mapping) else None
            if isinstance(value, str) and self._groups.pop(value, None) is not None:
                self._present[value] = None  # reloaded from the collection when next needed
        self.store.update(docs, key=key)

    def _group(self, value: str, *, adopt: bool) -> list[dict[str, Any]] | None:
        """This run's documents with ``field == value`` (loaded once if they predate the run).

        None when ``value`` is unknown to the index and not ``adopt`` ed: not written by this
        run, nor present before it; it may have been written meanwhile by someone else.
        """
        group = self._groups.get(value)
        if group is not None:
            return group
        if value in self._present:
            found = list(self._collection.find({self.field: value}))
            if any(doc["_id"] not in self._position for doc in found):
                return None  # written by someone else since the run began: the store answers
            found.sort(key=lambda doc: self._position[doc["_id"]])
            del self._present[value]
            group = self._groups[value] = found
            return group
        if not adopt:
            return None
        group = self._groups[value] = []
        return group

    # -- reading --------------------------------------------------------------------------------
    def query(
        self,
        criteria: dict[str, Any] | None = None,
        properties: dict[str, Any] | list[str] | None = None,
        sort: dict[str, Sort | int] | None = None,
        hint: dict[str, Sort | int] | None = None,
        skip: int = 0,
        limit: int = 0,
        **kwargs: Any,
    ) -> Iterator[dict[str, Any]]:
        """``MemoryStore.query``, from the index when ``criteria`` names this run's uuids."""
        docs = None
        if self._usable and not hint and not kwargs:
            docs = self._answer(criteria, properties, sort, skip, limit)
        if docs is None:
            yield from self.store.query(
                criteria=criteria,
                properties=properties,
                sort=sort,
                hint=hint,
                skip=skip,
                limit=limit,
                **kwargs,
            )
        else:
            yield from docs

    def query_one(
        self,
        criteria: dict[str, Any] | None = None,
        properties: dict[str, Any] | list[str] | None = None,
        sort: dict[str, Sort | int] | None = None,
    ) -> dict[str, Any] | None:
        """``Store.query_one``, through :meth:`query`."""
        return next(self.query(criteria=criteria, properties=properties, sort=sort), None)

    def _answer(
        self,
        criteria: dict[str, Any] | None,
        properties: dict[str, Any] | list[str] | None,
        sort: dict[str, Sort | int] | None,
        skip: int,
        limit: int,
    ) -> list[dict[str, Any]] | None:
        """The documents ``find`` would return, or None when the index cannot tell."""
        if not isinstance(criteria, dict) or type(skip) is not int or type(limit) is not int:
            return None
        values = _required_values(criteria, self.field)
        fields = _included_fields(properties)
        order = _sort_keys(sort if sort else self.store.default_sort)
        if values is None or fields is None or order is None or skip < 0:
            return None
        candidates: list[dict[str, Any]] = []
        for value in values:
            group = self._group(value, adopt=False)
            if group is None:
                return None
            candidates.extend(group)
        if len(values) > 1:
            candidates.sort(key=lambda doc: self._position[doc["_id"]])
        if len(criteria) == 1:  # only the uuid: every candidate matches (its uuid is a str)
            dataset = candidates
        else:
            dataset = [doc for doc in candidates if filter_applies(criteria, doc)]
        for sort_key, direction in reversed(order):
            dataset = sorted(
                dataset,
                key=lambda doc, k=sort_key: resolve_sort_key(k, doc),  # type: ignore[misc]
                reverse=direction < 0,
            )
        dataset = dataset[skip:]
        if limit:
            dataset = dataset[: abs(limit)]
        return [_project(doc, fields) for doc in dataset]


def _insertable(doc: Any, fields: list[str], field: str) -> bool:
    """True when ``doc`` can take the insert path (the key is complete, ``_id`` left to us)."""
    return (
        isinstance(doc, dict)
        and "_id" not in doc
        and all(k in doc for k in fields)
        and isinstance(doc.get(field), str)
    )


def _required_values(criteria: dict[str, Any], field: str) -> list[str] | None:
    """The values a document's ``field`` must have to match ``criteria`` (None: any)."""
    value = criteria.get(field)
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and list(value) == ["$in"]:
        values = value["$in"]
        if isinstance(values, list | tuple) and all(isinstance(v, str) for v in values):
            return list(dict.fromkeys(values))
    return None


def _included_fields(properties: Any) -> list[str] | None:
    """Top-level field names of an inclusion projection ([] for the whole document).

    None for anything else (dotted paths, exclusions, operators): the store answers those.
    """
    if properties is None:
        return []
    if isinstance(properties, dict):
        if not all(v is True or (type(v) is int and v == 1) for v in properties.values()):
            return None
    elif not isinstance(properties, list | tuple):
        return None
    names = list(properties)
    if not names:
        return []  # pymongo: an empty projection returns the whole document
    if all(isinstance(n, str) and n and "." not in n and not n.startswith("$") for n in names):
        return names
    return None


def _sort_keys(sort: Any) -> list[tuple[str, int]] | None:
    """``MemoryStore.query``'s sort list; None for what the index does not sort itself."""
    if not sort:
        return []
    if not isinstance(sort, dict):
        return None
    order = []
    for key, direction in sort.items():
        value = Sort(direction).value if isinstance(direction, int) else direction.value
        if not isinstance(key, str) or key.startswith("$"):
            return None
        order.append((key, value))
    return order


def _project(doc: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """What mongomock returns for ``doc`` with an inclusion projection of ``fields``."""
    if not fields:
        return cast("dict[str, Any]", _copy(doc))
    wanted = set(fields)
    projected = {k: _copy(v) for k, v in doc.items() if k in wanted and k != "_id"}
    if "_id" in doc:
        projected["_id"] = doc["_id"]
    return projected


def _copy(value: Any) -> Any:
    """mongomock's copy of a stored value: new dicts and lists, leaves copied shallowly."""
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    return copy.copy(value)
