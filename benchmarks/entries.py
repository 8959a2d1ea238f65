"""Realistic cache entries and the embedded store they go into, for the store benchmarks.

An entry looks like one recorded by a small relaxation job: a JSON output of about 1 kB (energy,
forces, a two-site structure), per-argument digests, the canonical input and package versions.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash

from jobflow_cache import SCHEME, CacheEntry, CacheStore, SQLiteBackend
from jobflow_cache.entry import package_versions

__all__ = ["cache_store", "digest_of", "document_batches", "sealed_entry"]

logger = logging.getLogger(__name__)

_STRUCTURE = {
    "@module": "pymatgen.core.structure",
    "@class": "Structure",
    "charge": 0,
    "lattice": {
        "matrix": [[0.0, 2.715, 2.715], [2.715, 0.0, 2.715], [2.715, 2.715, 0.0]],
        "pbc": [True, True, True],
    },
    "properties": {},
    "sites": [
        {
            "species": [{"element": "Si", "occu": 1}],
            "abc": [frac, frac, frac],
            "properties": {},
            "label": "Si",
        }
        for frac in (0.0, 0.25)
    ],
}

_OUTPUT = json.dumps(
    {
        "energy": -10.84,
        "forces": [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        "stress": [[-1.2, 0.0, 0.0], [0.0, -1.2, 0.0], [0.0, 0.0, -1.2]],
        "structure": _STRUCTURE,
        "converged": True,
    }
)


def digest_of(tag: str) -> str:
    """A 32-hex digest derived from ``tag`` (same shape as a real job digest)."""
    return xxhash.xxh3_128_hexdigest(tag.encode())


def sealed_entry(tag: str) -> CacheEntry:
    """A complete, sealed entry (valid checksum) whose digest derives from ``tag``."""
    args = {"structure": _STRUCTURE, "steps": 100, "fmax": 0.01}
    return CacheEntry(
        digest=digest_of(tag),
        scheme=SCHEME,
        function="atomate2.ase.jobs:AseRelaxMaker.make",
        name="relax",
        output=_OUTPUT,
        source_uuid=str(uuid.uuid4()),
        source_dir=f"/scratch/runs/job_{tag}",
        arg_digests={name: digest_of(f"{tag}-{name}") for name in args},
        canonical_input=args,
        duration=12.5,
        versions=package_versions("atomate2.ase.jobs:AseRelaxMaker.make"),
    ).seal()


def document_batches(start: int, stop: int, batch: int = 5000) -> Iterator[list[dict[str, Any]]]:
    """Store documents of sealed entries ``entry-<start>`` ... ``entry-<stop - 1>`` in batches.

    Each document is a real :meth:`CacheEntry.to_document` with its own digest, uuid and
    checksum; only the model is reused (``model_copy``), which keeps a 1e6-entry store quick
    to build.
    """
    template = sealed_entry("template")
    docs: list[dict[str, Any]] = []
    for i in range(start, stop):
        tag = f"entry-{i}"
        entry = template.model_copy(
            update={"digest": digest_of(tag), "source_uuid": str(uuid.UUID(int=i))}
        )
        docs.append(entry.seal().to_document())
        if len(docs) == batch:
            yield docs
            docs = []
    if docs:
        yield docs


def cache_store(cache_dir: str | Path) -> CacheStore:
    """The embedded default store under ``cache_dir`` (as ``JOBFLOW_CACHE_DIR=cache_dir`` does)."""
    root = Path(cache_dir)
    return CacheStore(SQLiteBackend(root / "cache.sqlite"), objects_dir=root / "objects")
