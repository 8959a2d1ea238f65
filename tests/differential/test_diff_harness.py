"""The harness itself: it must see a stale value, and its normalisation must keep types."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.differential.harness import (
    Normaliser,
    Scenario,
    World,
    _exact,
    compare,
    run_worlds,
    typed,
    write,
)


def _knob(world: World) -> None:
    write(world.data / "knob.txt", "3\n")


def _turn_knob(world: World, step: int) -> None:
    write(world.data / "knob.txt", "4\n")


def test_a_stale_value_shows(tmp_path: Path) -> None:
    """A file read without being named in the inputs is invisible to any digest (documented):
    the cache serves the old value, and the harness must report exactly that difference."""
    scenario = Scenario("tests.differential.programs:hidden_input", setup=_knob, between=_turn_knob)
    plain, cached = run_worlds(scenario, "folders-local", tmp_path)
    assert cached.counts[1]["read_knob"] == 0  # served
    problems = compare(plain, cached, scenario)
    assert [p.split(":")[0] for p in problems] == ["step 2", "step 2"]  # responses, documents
    assert problems[0].startswith("step 2: runs differ")
    assert '-    "output": 8,' in problems[0]
    assert '+    "output": 6,' in problems[0]
    assert '-  "output": 8,' in problems[1]
    assert '+  "output": 6,' in problems[1]


def test_typed_keeps_what_the_store_loses() -> None:
    pairs = [
        (np.float32(0.5), 0.5),
        ((0, 1), [0, 1]),
        (np.int64(1), 1),
        (True, 1),
        (1, 1.0),
        (np.arange(2, dtype=np.int32), np.arange(2, dtype=np.int64)),
        (-0.0, 0.0),
    ]
    for a, b in pairs:
        assert _exact(typed(a)) != _exact(typed(b)), (a, b)


def test_normaliser_labels_by_step_and_name(tmp_path: Path) -> None:
    uuid1 = "11111111-1111-1111-1111-111111111111"
    uuid2 = "22222222-2222-2222-2222-222222222222"
    world = World("plain", tmp_path, True, {})
    folder = tmp_path / "run" / "job_2026-12-07-03-00-00-123456-12345"
    world.results = [
        {"order": [uuid1], "names": {uuid1: "a"}, "job_dirs": {uuid1: str(folder)}},
        {"order": [uuid2], "names": {uuid2: "a"}, "job_dirs": {}},
    ]
    norm = Normaliser(world)
    assert norm.text(f"{folder}/x {uuid1} {uuid2}") == ("<W>/run/<dir s1:a#0>/x <s1:a#0> <s2:a#0>")
    # a uuid of neither run (a stale one) keeps a label of its own
    assert norm.text("33333333-3333-3333-3333-333333333333") == "<<uuid?0>>"
