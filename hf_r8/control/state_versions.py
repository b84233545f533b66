"""The version of every state hf_r8 saves, in one place, and one way to read it back.

Each saved state carries `"version"`: its shape changes, the number goes up, and the loader of the new shape
still reads the old ones (a state saved before its component had a version reads as `unversioned`). A state
newer than this hf_r8 reads is refused with a message that names the component and both versions, never
half-loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CALLBACK = 3
"""`R8Callback`'s entry in `trainer_state.json`: 3 nests the engine's state under "engine" (2 flattened it)."""
CONTROLLER = 2
"""The controller: 2 keeps each rule's state under its name (1 kept them in the group)."""
ENGINE = 1
SCHEDULER = 1
"""`AdaptiveScheduler.state_dict()`: 1 nests the engine's state under "engine" (unversioned flattened it)."""
LOOP = 1
CATALOG = 1
"""`r8_catalog.npz`: 1 names alpha and the non-finite count (unversioned: a positional `meta` array)."""
SAMPLER = 1
"""The sampler's plan (`r8_epoch_plan.npz`, `R8Loop`'s "sampler"): 1 adds the stabilization under way."""
SIGNAL_STAGE = 2
"""The staged signals of a finished step: 2 adds the update alignment (1 held four signals, unversioned the layout
its adapter wrote)."""


def saved_version(component: str, state: Mapping[str, Any], current: int, unversioned: int = 0) -> int:
    """The version `state` was saved in (`unversioned` when it has none); a ValueError when it is newer than
    `current`, the version this hf_r8 writes."""
    version = state.get("version")
    if version is None:
        return unversioned
    version = int(version)  # a `.npz` holds it as a 0-d array
    if version > current:
        raise ValueError(f"the {component} state is version {version}, newer than this hf_r8 reads ({current}): "
                         "upgrade hf_r8 to resume it")
    return version
