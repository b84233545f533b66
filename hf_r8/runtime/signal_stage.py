"""One finished step's signals on their way to the controller, staged the same way by every adapter.

A step's packed signals (`signal_packing.py`) are staged when the step ends: their copy to the host starts
without waiting for the device (`HostCopy`), and the adapter takes them just before the next step's LR is
written, by which time they have landed. So the LR of step t+1 answers step t and nothing forces a device
sync. What is staged and not yet taken is part of a checkpoint, in one versioned shape for every adapter.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_r8.control import state_versions
from hf_r8.control.controller import Observation
from hf_r8.runtime.host_copy import HostCopy
from hf_r8.runtime.signal_packing import SIGNAL_NAMES, unpack_signals

VERSION_1_LAYOUT = ("loss", "grad_norm", "reward", "router_aux_loss")
"""The signals version 1 of the stage's state held (before the update alignment), in order."""


class SignalStage:
    """The packed signals of the last finished step, staged once and taken once."""

    def __init__(self) -> None:
        self._copy: HostCopy | None = None
        self._step = 0

    def stage(self, step: int, packed: torch.Tensor) -> None:
        """Start the copy of step `step`'s packed signals to the host (replacing any not taken)."""
        self._step, self._copy = step, HostCopy(packed)

    def take(self) -> Observation | None:
        """The staged step's signals (waiting for their copy only), once; None when none is staged."""
        if self._copy is None:
            return None
        observation = unpack_signals(self._step, self._copy.result().tolist())
        self._copy = None
        return observation

    def discard(self) -> None:
        self._copy = None

    def state_dict(self) -> dict[str, Any] | None:
        """The staged step and its packed values, as plain data; None when nothing is staged."""
        if self._copy is None:
            return None
        return {"version": state_versions.SIGNAL_STAGE, "step": self._step, "values": self._copy.result().tolist()}

    def load_state_dict(self, state: dict[str, Any] | None,
                        unversioned_layout: tuple[str, ...] = VERSION_1_LAYOUT) -> None:
        """Stage `state_dict()`'s output again. An older state's values are (sum, count) pairs of the signals its
        version held: version 1's `VERSION_1_LAYOUT`; one saved before the stage had a version, those
        `unversioned_layout` names, in that order (the adapter that saved it knows which). A signal it lacks is
        missing (0, 0)."""
        if state is None:
            self._copy = None
            return
        version = state_versions.saved_version("staged signals", state, state_versions.SIGNAL_STAGE)
        values = list(state["values"])
        if version < state_versions.SIGNAL_STAGE:
            layout = VERSION_1_LAYOUT if version == 1 else unversioned_layout
            pairs = {name: values[2 * index:2 * index + 2] for index, name in enumerate(layout)
                     if 2 * index + 2 <= len(values)}
            values = [value for name in SIGNAL_NAMES for value in pairs.get(name, [0.0, 0.0])]
        self.stage(state["step"], torch.tensor(values, dtype=torch.float32))
