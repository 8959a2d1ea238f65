"""In-flight deduplication (``JOBFLOW_CACHE_DEDUP``): one worker computes a digest, others wait.

Before running a job it does not serve, a worker claims the job's digest in the store
(:mod:`.shared`). Holding the claim, it looks the entry up once more (its previous holder may
have stored it between the first lookup and the claim), then runs the job while a
:class:`.Heartbeat` renews the claim, and lets go once the entry is written: inside
:meth:`.Cache.accepting` after jobflow accepted the output, else at once after a flush. A worker
that finds the digest claimed waits (backing off up to a quarter of the lease) and serves the
entry as soon as the store has it.

Contract: every lookup is the session's one lookup path (:meth:`.StoreSession.lookup`), which
sees entries this process queued but did not write yet; a store that fails while claiming
makes the worker compute without a claim (logged, never raised); a claim is released when the
job fails, and otherwise expires with its lease if releasing fails.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from jobflow import Response

from jobflow_cache.execution.call import Call
from jobflow_cache.execution.claims import Coordinator, Heartbeat
from jobflow_cache.execution.report import progress
from jobflow_cache.execution.serving import NotServed, Server, this_host
from jobflow_cache.execution.session import HELD, StoreSession
from jobflow_cache.settings import CacheSettings
from jobflow_cache.store import Outcome

__all__ = ["InFlight"]

logger = logging.getLogger(__name__)

#: Runs the job and records it; given why it runs after waiting (a folder conflict), if so.
Run = Callable[[str | None], Any]


class InFlight:
    """Claims on the digests this session computes (see the module docstring).

    Parameters
    ----------
    session
        The store's claims, and the one lookup path.
    server
        Serves the entry another worker stored.
    settings
        ``LEASE``: seconds a claim lasts unless renewed.
    """

    def __init__(self, session: StoreSession, server: Server, settings: CacheSettings) -> None:
        self._session = session
        self._server = server
        self._settings = settings
        self._token = uuid.uuid4().hex[:8]

    def run_claimed(self, call: Call, run: Run) -> Any:
        """Run the job (``run`` runs and records it) under a claim on its digest, or wait for
        the worker holding the claim and serve its result."""
        digest = call.digest
        claims = self._session.coordinator()
        owner = f"{this_host()}:{os.getpid()}:{self._token}"
        conflict: str | None = None
        if claims is not None:
            try:
                served = self._await_claim(call, claims, owner)
            except Exception as err:  # the store failed: compute without a claim
                logger.warning(
                    "could not claim %s (%s); running %s", digest[:12], err, call.job.name
                )
                claims = None
            else:
                if isinstance(served, NotServed):
                    conflict = served.conflict
                elif served is not None:
                    return served
        if claims is None:
            return run(conflict)
        held_claims = claims

        def release() -> None:
            try:
                held_claims.release(digest, owner)
            except Exception as err:  # the lease runs out by itself
                logger.warning("could not release the claim on %s: %s", digest[:12], err)

        held = HELD.get()
        try:
            with Heartbeat(claims, digest, owner, self._settings.LEASE):
                response = run(conflict)
        except BaseException:
            release()
            raise
        if held is not None:  # the entry is written once jobflow accepts the output: then
            held.after.append(release)  # the waiters are let go (see accepting)
        else:
            try:
                self._session.flush()  # the entry is in the store before the waiters are let go
            finally:
                release()
        return response

    def _await_claim(
        self, call: Call, claims: Coordinator, owner: str
    ) -> Response | NotServed | None:
        """Claim the digest (None: the caller computes it), or wait while another worker holds
        the claim and return its result once it is stored (:class:`.NotServed` when it cannot
        be served here: the caller computes it).

        The entry is looked up again right after a claim is taken: its owner may have stored
        it and let go between this worker's first lookup and its claim.
        """
        job, digest = call.job, call.digest
        delay, waiting_since = 0.02, None
        while True:
            holder = claims.claim(digest, owner, self._settings.LEASE)
            if holder == owner:
                found = self._session.lookup(digest)
                if found.outcome is Outcome.HIT and found.entry is not None:
                    claims.release(digest, owner)
                    return self._server.serve(call, found.entry)
                return None
            if waiting_since is None:
                waiting_since = time.monotonic()
                progress.info(
                    "Waiting - %s (%s): %s computes the same job (%s)",
                    job.name,
                    job.uuid,
                    holder,
                    digest[:12],
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0, self._settings.LEASE / 4)
            found = self._session.lookup(digest)
            if found.outcome is Outcome.HIT and found.entry is not None:
                logger.debug(
                    "%s served after waiting %.2f s", job.name, time.monotonic() - waiting_since
                )
                return self._server.serve(call, found.entry)
