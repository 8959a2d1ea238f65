"""Differential tests (issue 11): every scenario runs under plain jobflow and under the cache,
in fresh processes, with something changed between runs; outputs and run-folder files must be
the same byte for byte. See :mod:`tests.differential.harness`."""
