"""Entries recorded under an older hash scheme (jfc1): a clean miss, labelled by explain,
removed by purge(outdated_schemes=True)."""

from __future__ import annotations

from click.testing import CliRunner

from jobflow_cache import CacheStore, run_locally
from jobflow_cache.admin.purge import purge
from jobflow_cache.cli import cli
from jobflow_cache.hashing.canonical import SCHEME, digest_bytes, digest_value, encode
from tests.support import jobs


def _jfc1_twin(cache: CacheStore, digest: str):
    """The entry jfc1 recorded for the same call: jfc1 hashed a tuple as its list, and put its
    own id in the call digest."""
    entry = cache.get(digest)
    arg_digests = {"a": digest_value([1, 2]), "b": digest_value([3])}
    pairs = [[name, arg_digests[name]] for name in sorted(arg_digests)]
    old = digest_bytes(encode(["call", "jfc1", entry.function, entry.cache_version, pairs]))
    return entry.model_copy(
        update={
            "digest": old,
            "scheme": "jfc1",
            "arg_digests": arg_digests,
            "canonical_input": {"a": [1, 2], "b": [3]},
        }
    )


def test_old_scheme_entries_are_clean_misses_explained_and_purged(counts, run_dir) -> None:
    assert SCHEME == "jfc2"
    # a template of the entry, then the cache as the old version left it: one jfc1 entry
    run_locally(jobs.add((1, 2), (3,)), log=False, ensure_success=True)
    with CacheStore.from_settings() as cache:
        (template,) = [doc["digest"] for doc in cache.find({}, properties=["digest"])]
        old = _jfc1_twin(cache, template)
        purge(cache, {})
        cache.put(old)
    counts.reset()

    # a clean miss: the job runs (no CacheWarning: conftest fails on one), its result is right
    job = jobs.add((1, 2), (3,))
    responses = run_locally(job, log=False, ensure_success=True)
    assert counts()["add"] == 1
    assert responses[job.uuid][1].output == (1, 2, 3)
    with CacheStore.from_settings() as cache:
        docs = {d["digest"]: d["scheme"] for d in cache.find({}, properties=["digest", "scheme"])}
        assert docs == {old.digest: "jfc1", template: "jfc2"}
        assert cache.lookup(template).outcome.value == "hit"

    # explain labels the old entry
    result = CliRunner().invoke(cli, ["explain", template[:12]])
    assert result.exit_code == 0, result.output
    assert "recorded under hash scheme jfc1 (now jfc2): a clean miss" in result.output
    assert old.digest[:12] in result.output
    data = CliRunner().invoke(cli, ["explain", template[:12], "--json"])
    assert '"scheme": "jfc1"' in data.output

    # purge --outdated: a dry run lists it, then only it goes
    with CacheStore.from_settings() as cache:
        dry = purge(cache, {}, outdated_schemes=True, dry_run=True)
        assert (dry.entries, dry.digests) == (1, [old.digest])
        assert cache.count() == 2
        report = purge(cache, {}, outdated_schemes=True)
        assert (report.entries, report.digests) == (1, [old.digest])
        assert [d["digest"] for d in cache.find({}, properties=["digest"])] == [template]
        assert purge(cache, {"function": "x:y"}, outdated_schemes=True).entries == 0
        assert cache.count() == 1

    # the jfc2 entry still serves
    counts.reset()
    again = jobs.add((1, 2), (3,))
    assert run_locally(again, log=False, ensure_success=True)[again.uuid][1].output == (1, 2, 3)
    assert counts()["add"] == 0
