"""Looking after a cache: what ``cachetool`` does, as functions.

==================  ========================================================================
module              what it does
==================  ========================================================================
:mod:`.listing`     filters, listings, digest prefixes and stats, streamed from the store
:mod:`.verify`      checks every entry the way a hit would trust it
:mod:`.purge`       removes entries and collects the file objects no entry references
:mod:`.explain`     why a job missed: its inputs compared with the nearest cached entries
==================  ========================================================================

Nothing in the execution core imports this package.
"""
