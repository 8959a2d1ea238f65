"""One step of one world of a differential scenario: ``python -m tests.differential.step``.

The step's spec is the JSON file named by ``JFC_DIFF_SPEC`` (written by the harness)."""

from tests.differential.harness import step_main

if __name__ == "__main__":
    step_main()
