"""The parts of the execution core that :class:`.Cache` composes, each owning its state.

One job's path through :meth:`.Cache.call` is a short sequence (digest, lookup, then serve, or
run and record, with claims around the run under DEDUP) over one :class:`.Call` value:

=================  ===========================================================================
module             owns
=================  ===========================================================================
:mod:`.options`    :class:`.JobOptions` (what a user asks for one job) and the metadata key
:mod:`.report`     :class:`.CacheReport` and the record in each job's metadata
:mod:`.call`       :class:`.Call` (one job's call), :class:`.Role` (what a session may do),
                   :class:`.Intercept` (the stand-in for ``job.function``)
:mod:`.session`    :class:`.StoreSession`: the store's health (one :class:`.Health` value),
                   the one lookup path, the writes behind a run, claims and aliases
:mod:`.folders`    :class:`.Excludes`: which files of a run folder are a job's
:mod:`.lineage`    :class:`.Lineage`: which job uuid and run folder belong to which digest
:mod:`.digest`     :func:`.digest_of`: the digest of a call
:mod:`.serving`    :class:`.Server`: a hit replayed into the job
:mod:`.recording`  :class:`.Recorder`: a job run, and its entry recorded
:mod:`.dedup`      :class:`.InFlight`: claims on the digests being computed, and waiting
=================  ===========================================================================

Contract: :mod:`.cache` (:class:`.Cache`, the one interception core) composes the parts, and
no part imports it (the parts depend on each other in the order of the table); no part reaches
into another's state, they call each other's methods; none of them ever fails a job for a
cache problem. :mod:`.claims` holds the claim heartbeat that :mod:`.dedup` uses.
"""

from __future__ import annotations

from jobflow_cache.execution.call import Call, Intercept, Refs, Role
from jobflow_cache.execution.options import META_KEY, JobOptions, job_options
from jobflow_cache.execution.report import CacheReport
from jobflow_cache.execution.session import Health, StoreSession

__all__ = [
    "META_KEY",
    "Call",
    "CacheReport",
    "Health",
    "Intercept",
    "JobOptions",
    "Refs",
    "Role",
    "StoreSession",
    "job_options",
]
