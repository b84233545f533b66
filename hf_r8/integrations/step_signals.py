"""One optimizer step's signals, from the Trainer to the controller, without stalling the device.

A step's loss and gradient norm (`taps.py`), the reward scored for it (`rewards.py`), the MoE router
aux loss and, for the hypergradient rule, the update alignment (`runtime/update_alignment.py`) are packed
into one small tensor of (sum, count) pairs (`runtime/signal_packing.py`) and summed across processes.
At the step's end its copy to the host starts without waiting; the controller reads it at
the next step, by which time it has landed (`runtime/signal_stage.py`, the stage every adapter uses). Where a
step must be judged before it is applied (the guard, rollback), `read_now` reads it on the host at once and
the same values are staged; the LR range test's sweep, before the first step, reads its loss with `loss_now`.
"""

from __future__ import annotations

import torch

from hf_r8.control.controller import Observation
from hf_r8.integrations.rewards import RewardTracker
from hf_r8.integrations.taps import TrainerTaps
from hf_r8.runtime.distributed import sum_across_processes
from hf_r8.runtime.signal_packing import pack_signals, unpack_signals
from hf_r8.runtime.signal_stage import SignalStage


class StepSignals:
    """The signals of the step in flight and of the last finished step, on their way to the controller."""

    def __init__(self, taps: TrainerTaps, rewards: RewardTracker, device: torch.device) -> None:
        self.taps = taps
        self.rewards = rewards
        self.device = device
        self.checked: list[float] | None = None
        """This step's signals, already read on the host (by the guard)."""
        self.dropped = False
        """Whether this step was skipped or rolled back: the controller never sees its signals."""
        self.stage = SignalStage()
        """The last finished step's signals, on their way to the host (saved with the run's state)."""
        self.alignment: torch.Tensor | None = None
        """This step's update alignment (a device scalar), measured just before the optimizer steps."""

    def read_now(self, step: int) -> Observation:
        """This step's signals, read on the host now (one sync), before the step is applied."""
        self.checked = self._reduced().tolist()
        return unpack_signals(step, self.checked)

    def loss_now(self) -> float | None:
        """The loss of the training steps run since `taps.start_step()`, over all processes, read on the host now
        (one sync): the LR range test's sweep, which the controller never sees."""
        return unpack_signals(0, self._reduced().tolist()).loss

    def end_step(self, step: int) -> Observation | None:
        """Stage the finished step's signals for the next step; a dropped step's are returned for the record
        only (it is not evidence about the LR)."""
        if self.dropped:
            dropped = unpack_signals(step, self.checked)
            self.dropped, self.checked, self.alignment = False, None, None
            return dropped
        self.stage.stage(step, torch.tensor(self.checked, dtype=torch.float32) if self.checked is not None
                         else self._reduced())
        self.checked = self.alignment = None
        return None

    def take_pending(self) -> Observation | None:
        """The last finished step's signals (with the KL logged since), once; None when there are none."""
        pending = self.stage.take()
        if pending is not None:
            pending.kl = self.rewards.take_kl()
        return pending

    def _reduced(self) -> torch.Tensor:
        """The packed signals summed over processes, on device (a NaN anywhere is NaN). The rewards recorded
        since the previous step are used up here."""
        taps = self.taps
        grad_norm = None
        if taps.grad_norm is not None:
            grad_norm = torch.as_tensor(taps.grad_norm).to(device=self.device, dtype=torch.float32)
        reward, reward_count = self.rewards.take_step_reward()
        packed = pack_signals(self.device, loss=taps.step_loss, grad_norm=grad_norm,
                              reward=reward if reward_count else None, router_aux_loss=taps.step_aux_loss(),
                              update_alignment=self.alignment)
        return sum_across_processes(packed)
