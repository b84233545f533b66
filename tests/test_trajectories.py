"""The fixed runs of `tests/trajectories.py` give exactly the recorded LR, gain, momentum, events and catalog.

A reorganisation of the code must not move any of them by a bit; a change meant to alter behaviour regenerates
`tests/data/trajectories.json` (`python -m tests.trajectories --write`) in the same commit.
"""

from __future__ import annotations

import json

import pytest

from tests.trajectories import GOLDEN, record

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # Through JSON, as the file was written: tuples become lists, floats keep every bit (repr round-trips).
    return json.loads(json.dumps(record(str(tmp_path_factory.mktemp("trajectories")))))


@pytest.mark.parametrize("name", sorted(json.loads(GOLDEN.read_text(encoding="utf-8"))))
def test_the_run_is_unchanged_to_the_last_bit(runs, name):
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))[name]
    assert runs[name].keys() == golden.keys()
    for series, expected in golden.items():
        assert runs[name][series] == expected, f"{name}/{series} changed"
