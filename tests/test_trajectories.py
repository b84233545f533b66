"""The fixed runs of `tests/trajectories.py` give the recorded LR, gain, momentum, events and catalog.

A reorganisation of the code must not move any of them. What is discrete (a step, a group, a rule, an action, a
batch's examples, a usage count) compares exactly; a float compares to a relative tolerance of `RELATIVE` (5e-6):
the same code on another CPU (another vector width: AVX-512, AVX2 or none) moves a float by 1e-8 to 2e-6, while a
changed rule or constant moves a recorded run by far more (`python -m tests.trajectories --sensitivity` multiplies
each float config field by 1.01 in turn and reports whether the comparison still catches every run it moves).
A change meant to alter behaviour regenerates `tests/data/trajectories.json`
(`python -m tests.trajectories --write`) in the same commit.
"""

from __future__ import annotations

import json

import pytest

from tests.trajectories import GOLDEN, RECORDED_ON, differences, record

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # Through JSON, as the file was written: tuples become lists.
    return json.loads(json.dumps(record(str(tmp_path_factory.mktemp("trajectories")))))


@pytest.mark.parametrize("name", sorted(set(json.loads(GOLDEN.read_text(encoding="utf-8"))) - {RECORDED_ON}))
def test_the_run_is_unchanged(runs, name):
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))[name]
    found = differences(runs[name], golden, name)
    assert not found, "\n".join(found[:20])


def test_differences_tells_a_cpu_apart_from_a_change():
    """The comparison itself: a ~1e-8 relative difference passes, 1e-4 does not, nor any discrete change."""
    golden = {"lrs": [1e-3, 0.0, None, float("nan")], "events": [[5, 0, "trend", "trend_up", 1.0, 1.0074823]]}
    assert not differences({"lrs": [1e-3 * (1 + 1e-8), 0.0, None, float("nan")],
                            "events": [[5, 0, "trend", "trend_up", 1.0, 1.0074823 * (1 - 2e-8)]]}, golden, "run")
    for changed in ({"lrs": [1e-3 * (1 + 1e-4), 0.0, None, float("nan")], "events": golden["events"]},
                    {"lrs": golden["lrs"], "events": [[6, 0, "trend", "trend_up", 1.0, 1.0074823]]},
                    {"lrs": golden["lrs"], "events": [[5, 0, "trend", "trend_down", 1.0, 1.0074823]]},
                    {"lrs": golden["lrs"][:3], "events": golden["events"]},
                    {"lrs": [1e-3, 0.0, 0.9, float("nan")], "events": golden["events"]},
                    {"lrs": [1e-3, 0.0, None, 1.0], "events": golden["events"]}):
        assert differences(changed, golden, "run")
