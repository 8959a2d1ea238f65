"""Print the tables of a saved results file: ``python -m benchmarks.report RESULTS.json``.

``--markdown`` renders them as Markdown, as pasted into ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from benchmarks.common import STYLE
from benchmarks.run import render

__all__ = ["main"]

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Print every table of a results file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report")
    parser.add_argument("results", type=Path, help="a JSON file written by python -m benchmarks")
    parser.add_argument("--markdown", action="store_true", help="Markdown tables")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    STYLE["markdown"] = args.markdown
    facts = results["machine"]
    print(
        f"{results['mode']} run of {results['started']}, commit {facts['git_commit'][:12]}"
        f"{' (with uncommitted changes)' if facts['git_dirty'] else ''}, "
        f"{facts['cpu_count']} CPUs ({facts['cpu_model']}), load {facts['load_average']}, "
        f"Python {facts['python']}, {results.get('duration_s', 0) / 60:.0f} min\n"
    )
    for text in render(results):
        print(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
