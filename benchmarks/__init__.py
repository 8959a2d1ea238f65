"""jobflow-cache benchmark suite: ``python -m benchmarks [--quick] [--only NAME ...]``.

Standalone scripts, never collected by pytest. See ``docs/performance.md`` for the method and
the results on the reference machine.
"""
