"""The hypergradient rule: the gain follows the sign of d loss / d LR, both ways.

For an update theta_t = theta_{t-1} - lr * u_{t-1}, the loss after it moves with the LR as
d loss(theta_t) / d lr = -g_t . u_{t-1} (the hypergradient of Baydin et al., 2018): a gradient that still
points along the last update says a larger step would have gone further down; one that points back says
the step overshot. The runtime measures the cosine of g_t with u_{t-1} on the device (`update_alignment`,
`runtime/update_alignment.py`), packed with the step's other signals, so the rule costs no extra read.

One step's cosine is mostly minibatch noise, so the rule tests a window of them: while their mean lies more
than `significance` standard errors above zero the gain grows by `rate` per step, and while it lies as far
below zero it shrinks at the same rate; in between it holds. At the noise floor of a well-set LR,
consecutive noisy steps pull against each other (Pflug's test), so the alignment turns negative there and
the rule lowers the LR, as a schedule's decay would. No torch, no transformers.
"""

from __future__ import annotations

import math
from statistics import fmean, stdev
from typing import TYPE_CHECKING

from hf_r8.control.rules import Proposal, Rule, StepStatistics

if TYPE_CHECKING:
    from hf_r8.control.config import R8Config

HYPERGRADIENT = "hypergradient"
"""The rule's registered name."""


def measures_update_alignment(config: R8Config) -> bool:
    """Whether a run with `config` needs each step's update alignment measured (the rule is on)."""
    return HYPERGRADIENT in config.rules


class HypergradientRule(Rule):
    """x (1 + hypergradient.rate) while the window's mean alignment is `significance` standard errors above zero,
    / (1 + rate) while it is as far below, else nothing."""

    state_keys = ("alignments", "hypergradient_direction")

    def __init__(self, config: R8Config, router: bool = False) -> None:
        super().__init__(config, router)
        self.alignments: list[float] = []
        """The last `hypergradient.window` finite alignments, oldest first."""
        self.hypergradient_direction = 0

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        alignment = statistics.update_alignment
        config = self.config.hypergradient
        if alignment is None or not math.isfinite(alignment):
            return None
        self.alignments = [*self.alignments, alignment][-config.window:]
        t = self.alignment_t()
        direction = 0 if t is None or abs(t) <= config.significance else (1 if t > 0 else -1)
        changed = direction != self.hypergradient_direction
        self.hypergradient_direction = direction
        if direction == 0:
            return None
        action = f"hypergradient_{'up' if direction > 0 else 'down'}" if changed else ""
        reason = (f"mean alignment of the gradient with the last update {fmean(self.alignments):+.3g} "
                  f"({t:+.1f} standard errors over {len(self.alignments)} steps)")
        return self.proposal((1.0 + config.rate) ** direction, action, reason)

    def alignment_t(self) -> float | None:
        """The window's mean alignment in standard errors from zero; None until the window is full."""
        window = self.alignments
        if len(window) < self.config.hypergradient.window:
            return None
        spread = stdev(window)
        mean = fmean(window)
        if spread == 0.0:
            return math.copysign(math.inf, mean) if mean else 0.0
        return mean / (spread / math.sqrt(len(window)))
