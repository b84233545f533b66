"""The reward of each optimizer step in TRL's reward-driven trainers (GRPO, RLOO, PPO), for the controller.

`RewardTracker.track` wraps the user's reward functions (names kept for TRL's metrics): every score they
return in training is summed per function. A step's reward is what TRL logs as `reward`: the
`reward_weights`-weighted sum of each function's mean over the completions scored since the previous
optimizer step. Without tracked functions (reward models, PPO), the mean reward TRL logs is used for the
next step instead, and the KL to the reference model TRL logs goes with it.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

# The mean reward and the KL to the reference model in training logs: TRL's GRPO/RLOO, then PPO.
_LOGGED_REWARD_KEYS = ("reward", "objective/scores")
_LOGGED_KL_KEYS = ("kl", "objective/kl")


class RewardTracker:
    """Rewards scored since the last optimizer step: from tracked reward functions, else from the logs."""

    def __init__(self) -> None:
        self._sums: list[float] = []
        self._counts: list[int] = []
        self._logged_reward: float | None = None
        self._logged_kl: float | None = None
        self._trainer: Any = None

    def start_run(self, trainer: Any) -> None:
        """A new `train()`: nothing scored yet; `trainer` tells training from evaluation and holds the weights."""
        self._trainer = trainer
        self._sums, self._counts = [0.0] * len(self._sums), [0] * len(self._counts)
        self._logged_reward = self._logged_kl = None

    def track(self, reward_funcs: Callable[..., Any] | list[Callable[..., Any]]) -> list[Callable[..., Any]]:
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        if any(isinstance(func, (str, torch.nn.Module)) or not callable(func) for func in funcs):
            raise ValueError("track_rewards: reward_funcs must be functions (reward models and model names cannot "
                             "be wrapped; without tracked functions the logged `reward` is used)")
        self._sums, self._counts = [0.0] * len(funcs), [0] * len(funcs)
        return [self._tracked(func, index) for index, func in enumerate(funcs)]

    def _tracked(self, func: Callable[..., Any], index: int) -> Callable[..., Any]:
        def record(rewards: Any) -> None:
            if self._trainer is not None and not self._trainer.model.training:
                return  # evaluation rewards are not a training step's
            values = rewards.tolist() if hasattr(rewards, "tolist") else rewards
            finite = [float(value) for value in values if value is not None and math.isfinite(float(value))]
            self._sums[index] += math.fsum(finite)
            self._counts[index] += len(finite)

        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def tracked_async(*args: Any, **kwargs: Any) -> Any:
                rewards = await func(*args, **kwargs)
                record(rewards)
                return rewards

            return tracked_async

        @functools.wraps(func)
        def tracked(*args: Any, **kwargs: Any) -> Any:
            rewards = func(*args, **kwargs)
            record(rewards)
            return rewards

        return tracked

    def read_logs(self, logs: dict[str, float] | None) -> None:
        """TRL's logged mean reward (when no function is tracked) and KL, identical on every process."""
        reward = next((logs[key] for key in _LOGGED_REWARD_KEYS if key in (logs or {})), None)
        if not self._counts and isinstance(reward, (int, float)) and math.isfinite(reward):
            self._logged_reward = float(reward)
        kl = next((logs[key] for key in _LOGGED_KL_KEYS if key in (logs or {})), None)
        if isinstance(kl, (int, float)) and math.isfinite(kl):
            self._logged_kl = float(kl)

    def take_kl(self) -> float | None:
        """The KL logged since the last step, once."""
        kl, self._logged_kl = self._logged_kl, None
        return kl

    def take_step_reward(self) -> tuple[float, float]:
        """(reward, 1) from the tracked functions (or the logged reward) since the last step, else (0, 0)."""
        if self._logged_reward is not None:
            reward, self._logged_reward = self._logged_reward, None
            return reward, 1.0
        scored = [index for index, count in enumerate(self._counts) if count > 0]
        if not scored:
            return 0.0, 0.0
        weights = getattr(getattr(self._trainer, "args", None), "reward_weights", None) or [1.0] * len(self._counts)
        reward = math.fsum(weights[i] * self._sums[i] / self._counts[i] for i in scored)
        self._sums, self._counts = [0.0] * len(self._sums), [0] * len(self._counts)
        return reward, 1.0
