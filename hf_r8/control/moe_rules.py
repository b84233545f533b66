"""The mixture-of-experts router rule: damp a router group's LR while its load-balancing loss rises.

The controller keeps a fast and a slow EMA of the router aux loss (`moe.aux_loss_fast_beta`, `_slow_beta`)
and hands the rules the fast one's relative excess over the slow one (`StepStatistics.router_aux_rise`). The
rule runs in router groups only (and is off with `moe.aux_loss_rise: null`); its proposals, events and saved
state go by `moe_aux_loss`. No torch, no transformers.
"""

from __future__ import annotations

from hf_r8.control.rules import Proposal, Rule, StepStatistics

MOE_AUX_LOSS = "moe_aux_loss"


class RouterAuxLossRule(Rule):
    """x moe.decrease_factor, never weighted down, when the aux loss's fast EMA is more than moe.aux_loss_rise
    above its slow EMA (routing grows less balanced), at most once per moe.aux_loss_cooldown_steps steps."""

    state_keys = ("steps_since_damp",)
    steps_since_damp = 0
    """Steps since the last damping (the cooldown), this group's own once it counts."""

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        config, rise = self.config.moe, statistics.router_aux_rise
        self.steps_since_damp += 1
        if rise is None or rise <= config.aux_loss_rise or self.steps_since_damp < config.aux_loss_cooldown_steps:
            return None
        self.steps_since_damp = 0
        return self.proposal(config.decrease_factor, "router_damp",
                             f"router aux loss fast EMA is {rise:.1%} above its slow EMA "
                             f"(> moe.aux_loss_rise={config.aux_loss_rise:g})", blendable=False)
