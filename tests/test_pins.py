"""The pinned installs (`constraints.txt`, `constraints-ppo.txt`) agree with `pyproject.toml`.

`make test` installs the pins, so they are what the suite runs on; pyproject's lower bounds claim exactly that.
A pin outside a range would make pip fail (or resolve around it), and a dependency left unpinned would be whatever
the registry serves that day: both are caught here, before a fresh machine finds them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
UNPINNED = {"torch"}  # TORCH in the Makefile pins it (the PPO environment takes the dev extra and TRL 1.12)


def pins(name: str) -> dict[str, Version]:
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    found = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{name}: {line} is not an exact pin"
            found[canonicalize_name(requirement.name)] = Version(specifier.version)
    return found


def requirements(*extras: str) -> list[Requirement]:
    texts = PROJECT["dependencies"] + [text for extra in extras for text in PROJECT["optional-dependencies"][extra]]
    return [Requirement(text) for text in texts]


@pytest.mark.parametrize(("constraints", "extras"), [
    ("constraints.txt", ("trl", "peft", "dev", "bench", "deepspeed")),
    ("constraints-ppo.txt", ("dev",)),
])
def test_every_dependency_is_pinned_within_its_range(constraints, extras):
    pinned = pins(constraints)
    assert "hf-r8" not in pinned and "torch" not in pinned  # the project itself, and TORCH's choice
    for requirement in requirements(*extras):
        name = canonicalize_name(requirement.name)
        if name in UNPINNED:
            continue
        assert name in pinned, f"{constraints} does not pin {requirement.name}: run `make lock`"
        assert requirement.specifier.contains(pinned[name]), f"{constraints}: {name}=={pinned[name]} is outside " \
                                                             f"pyproject's {requirement}"

