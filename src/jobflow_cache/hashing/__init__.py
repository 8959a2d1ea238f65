"""Digests: what a job call, the user code it runs, and the files its inputs name hash to.

==================  ========================================================================
module              what it hashes
==================  ========================================================================
:mod:`.canonical`   a job call (function path + bound arguments) as a canonical tree, and
                    its versioned digest (:data:`SCHEME`); pure functions
:mod:`.code`        which code is the user's, and the digest of the user code a job runs
:mod:`.contents`    the files and folders a job's inputs name, memoised on their ``stat``
==================  ========================================================================

The public names of :mod:`.canonical` are re-exported here (``jobflow_cache.hashing.digest_value``).
"""

from __future__ import annotations

from jobflow_cache.hashing.canonical import SCHEME, CallDigest, digest_call, digest_value

__all__ = ["SCHEME", "CallDigest", "digest_call", "digest_value"]
