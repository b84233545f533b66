"""LR rules by name: the built-ins, the ones a user registers, and the set one parameter group runs.

`R8Config.rules` lists names from this registry, so a user adds a rule without editing the controller:

    register_rule("my_rule", MyRule)            # MyRule subclasses hf_r8.control.rules.Rule
    R8Config(rules=["decision", "my_rule"])

The reward rules (`reward.rules`) and the KL brake (`reward.kl_limit`) are built-ins chosen by their own
settings. Rules run in one fixed order whatever order a config lists them in: the built-in LR rules, the
user's in the order they were registered, the KL brake, then the reward rules. Blending sums logarithms,
and another order would move the LR by a rounding error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hf_r8.control.hypergradient import HYPERGRADIENT, HypergradientRule
from hf_r8.control.loss_rules import (
    CyclicalRule,
    DecisionRule,
    GradNormRule,
    LossDecayRule,
    PlateauRule,
    TrendRule,
    VarianceRule,
)
from hf_r8.control.moe_rules import MOE_AUX_LOSS, RouterAuxLossRule
from hf_r8.control.registry import Registry
from hf_r8.control.reward_rules import REWARD_RULE_CLASSES, KlBrakeRule
from hf_r8.control.rules import Rule

if TYPE_CHECKING:
    from hf_r8.control.config import R8Config

KL_BRAKE = "reward_kl"

RULES: Registry[Rule] = Registry(
    "rules",
    Rule,
    {"decision": DecisionRule, "trend": TrendRule, "variance": VarianceRule, "loss_decay": LossDecayRule,
     "grad_norm": GradNormRule, "cyclical": CyclicalRule, "plateau": PlateauRule,
     HYPERGRADIENT: HypergradientRule},
    register_with="hf_r8.control.rule_registry.register_rule",
    # the names the reward rules and the KL brake go by in proposals, blend weights and saved state
    reserved=(KL_BRAKE, MOE_AUX_LOSS, *(f"reward_{name}" for name in REWARD_RULE_CLASSES)),
)

# Where version 1 of the controller state kept each built-in rule's state: flat in its group's dict.
_VERSION_1_KEYS = {
    "decision": ("engine",),
    "trend": ("trend_direction",),
    "grad_norm": ("steps_since_grad_rule",),
    "plateau": ("plateau_best", "plateau_steps", "plateau_cooldown"),
    "cyclical": ("cycle_position", "cycle_length"),
    KL_BRAKE: ("kl_braking",),
    "reward_trend": ("reward_direction",),
}
# Where version 2 kept the router rule's cooldown: in its group's dict, before the rule was one.
_GROUP_KEYS = {MOE_AUX_LOSS: {"steps_since_damp": "steps_since_aux_rule"}}


def register_rule(name: str, rule: type[Rule]) -> None:
    """Make `rule` (a subclass of `Rule`) available as `name` in `R8Config.rules`.

    A built-in name is refused; a name registered again is replaced (a notebook cell may run twice).
    """
    RULES.register(name, rule)


def registered_rules() -> tuple[str, ...]:
    """The names `R8Config.rules` may list: the built-ins, then the user's in the order they were registered."""
    return RULES.names()


def check_rule_names(config: R8Config) -> None:
    """Resolve every rule name `config` holds (`rules`, `blend.weights`, `rule_settings`) in the registry, as it
    is now: an unknown one raises the registry's ValueError, which lists the registered names. Adapters call it
    when they take a config, so a YAML may name a rule registered after it was loaded, never after training
    starts."""
    for name in config.rules:
        RULES.get(name)
    blendable = (*RULES.names(), *(f"reward_{name}" for name in REWARD_RULE_CLASSES))
    unknown = [name for name in config.blend.weights if name not in blendable]
    if unknown:
        raise ValueError(f"blend.weights names {unknown}: each must be a rule name from {list(blendable)} (add one "
                         f"with {RULES.register_with})")
    for name in config.rule_settings:
        RULES.get(name)


def build_rules(config: R8Config, router: bool) -> dict[str, Rule]:
    """Fresh instances of the rules one parameter group runs, in their fixed order, keyed by the name their
    state is saved under, which each rule also knows as `name`. An unknown name in `config.rules` raises a
    ValueError listing the registered ones."""
    chosen = {name: RULES.get(name) for name in config.rules}
    rules = {name: chosen[name](config, router) for name in RULES.names() if name in chosen}
    if config.reward.kl_limit is not None:
        rules[KL_BRAKE] = KlBrakeRule(config, router)
    for name, rule in REWARD_RULE_CLASSES.items():
        if name in config.reward.rules:
            rules[f"reward_{name}"] = rule(config, router)
    if router and config.moe.aux_loss_rise is not None:
        rules[MOE_AUX_LOSS] = RouterAuxLossRule(config, router)
    for name, rule in rules.items():
        rule.name = name
    return rules


def version_1_rule_states(saved_group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-rule states of a group saved in version 1 of the controller state (flat keys in the group); a
    rule whose keys an older state lacks is left out, and starts fresh."""
    return {name: {key: saved_group[key] for key in keys} for name, keys in _VERSION_1_KEYS.items()
            if all(key in saved_group for key in keys)}


def rule_states_kept_in_the_group(saved_group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The states of rules that a saved group kept among its own fields before they were rules (the router rule's
    cooldown, up to hf_r8 0.3)."""
    return {name: {key: saved_group[old] for key, old in keys.items()} for name, keys in _GROUP_KEYS.items()
            if all(old in saved_group for old in keys.values())}
