"""Rules as registered classes: a user's rule runs in the pure controller by name, keeps and restores its own
state, and names that are unknown or taken are refused with the registered ones listed."""

from __future__ import annotations

import json

import pytest

from hf_r8.control.config import BlendConfig, R8Config, SignalConfig
from hf_r8.control.controller import Controller, GroupSpec, Observation
from hf_r8.control.rule_registry import RULES, register_rule, registered_rules
from hf_r8.control.rules import Proposal, Rule, StepStatistics

BUILT_IN_RULES = ("decision", "trend", "variance", "loss_decay", "grad_norm", "cyclical", "plateau",
                  "hypergradient")


class EveryThirdStep(Rule):
    """x1.25 on every third step it sees: a step rule with a counter of its own."""

    state_keys = ("seen",)

    def __init__(self, config: R8Config, router: bool = False) -> None:
        super().__init__(config, router)
        self.seen = 0

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        self.seen += 1
        if self.seen % 3:
            return None
        return Proposal("every_third", 1.25, "nudge", f"step {statistics.step} is a third step")


class InverseLoss(Rule):
    """A level rule: 1 / loss EMA, this step only."""

    kind = "level"

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        ema = statistics.loss.ema.value
        return None if ema is None else Proposal("inverse_loss", 1.0 / ema)


class Scaled(Rule):
    """A level rule with a setting of its own (`factor`), proposed under whatever name it was registered as."""

    kind = "level"

    def propose(self, statistics: StepStatistics) -> Proposal | None:
        return self.proposal(self.settings.get("factor", 1.0), "scaled", f"x{self.settings.get('factor', 1.0)}")


class ForgetsToRestore(InverseLoss):
    """Overrides state_dict to save a counter, but not load_state_dict to restore it."""

    def state_dict(self) -> dict:
        return {"seen": 1}


@pytest.fixture(autouse=True)
def user_rules(monkeypatch):
    """The user rules of these tests, registered for one test at a time."""
    monkeypatch.setattr(RULES, "_classes", dict(RULES._classes))
    register_rule("every_third", EveryThirdStep)
    register_rule("inverse_loss", InverseLoss)
    register_rule("forgets_to_restore", ForgetsToRestore)
    register_rule("scaled", Scaled)


def controller_running(*rules: str, **settings: dict) -> Controller:
    config = R8Config(rules=list(rules), signals=SignalConfig(window=5), blend=BlendConfig(stability_shift=0.0),
                      rule_settings=settings)
    return Controller(config, [GroupSpec(1e-3)], total_steps=100)


def feed(controller: Controller, losses: list[float], start: int = 1) -> tuple[list[float], list]:
    gains, events = [], []
    for step, loss in enumerate(losses, start=start):
        events += controller.observe(Observation(step, loss=loss))
        gains.append(controller.lr_gain(0))
    return gains, events


def test_a_registered_step_rule_moves_the_gain_as_it_proposes():
    gains, events = feed(controller_running("every_third"), [2.0] * 7)
    assert gains == pytest.approx([1.0, 1.0, 1.25, 1.25, 1.25, 1.25**2, 1.25**2], rel=1e-12)
    assert [(event.step, event.rule, event.action) for event in events] == [(3, "every_third", "nudge"),
                                                                            (6, "every_third", "nudge")]
    assert events[0].reason == "step 3 is a third step"


def test_a_registered_level_rule_applies_on_top_of_the_running_gain_for_one_step():
    controller = controller_running("every_third", "inverse_loss")
    gains, _ = feed(controller, [4.0, 4.0, 4.0, 2.0])
    # the loss EMA (beta 0.9) is 4, 4, 4, then 3.8; the level never enters the running gain
    assert gains == pytest.approx([0.25, 0.25, 1.25 / 4.0, 1.25 / 3.8], rel=1e-12)
    assert controller.groups[0].running_gain == pytest.approx(1.25, rel=1e-12)


def test_a_registered_rule_keeps_its_state_through_state_dict():
    original = controller_running("decision", "every_third")
    feed(original, [2.0, 1.9, 1.8, 1.7])
    state = json.loads(json.dumps(original.state_dict()))
    assert state["groups"][0]["rules"]["every_third"] == {"seen": 4}
    restored = controller_running("decision", "every_third")
    restored.load_state_dict(state)
    assert restored.state_dict() == original.state_dict()
    later = [1.6, 1.5, 1.5, 1.4, 1.3]
    assert feed(restored, later, start=5) == feed(original, later, start=5)
    assert original.groups[0].running_gain != 1.0  # else the comparison above proves nothing


def test_a_rule_that_saves_state_but_cannot_restore_it_says_so():
    controller = controller_running("forgets_to_restore")
    feed(controller, [1.0])
    with pytest.raises(NotImplementedError, match=r"ForgetsToRestore.load_state_dict\(\) does not restore \['seen'\]"):
        controller_running("forgets_to_restore").load_state_dict(controller.state_dict())


def test_rules_run_in_registration_order_whatever_order_the_config_lists_them():
    controller = controller_running("inverse_loss", "every_third", "trend", "decision")
    assert list(controller.group_rules[0]) == ["decision", "trend", "every_third", "inverse_loss"]


def test_built_in_names_stay_what_configs_list_and_user_names_follow():
    assert registered_rules() == (*BUILT_IN_RULES, "every_third", "inverse_loss", "forgets_to_restore", "scaled")


def test_an_unknown_rule_name_is_refused_naming_the_registered_ones():
    config = R8Config()
    config.rules = ["decision", "warp"]  # past R8Config's own check of the names, to reach the controller's
    with pytest.raises(ValueError, match=r"rules: 'warp' is not registered: must be one of \['decision', .*"
                                         r"'plateau', 'hypergradient', 'every_third', .*\] "
                                         r"\(add one with .*register_rule\)"):
        Controller(config, [GroupSpec(1e-3)])


@pytest.mark.parametrize(("name", "rule", "error", "message"), [
    ("trend", EveryThirdStep, ValueError, "'trend' is built into hf_r8"),
    ("reward_trend", EveryThirdStep, ValueError, "'reward_trend' is built into hf_r8"),
    ("reward_kl", EveryThirdStep, ValueError, "'reward_kl' is built into hf_r8"),
    ("", EveryThirdStep, ValueError, "must be a non-empty string"),
    (3, EveryThirdStep, TypeError, "name=3"),
    ("mine", object, TypeError, "must be a subclass of hf_r8.control.rules.Rule"),
    ("mine", EveryThirdStep(R8Config()), TypeError, "must be a subclass"),
])
def test_register_rule_refuses_taken_names_and_non_rules(name, rule, error, message):
    with pytest.raises(error, match=message):
        register_rule(name, rule)
    assert "mine" not in registered_rules()


def test_registering_a_user_name_again_replaces_it_in_place():
    register_rule("every_third", InverseLoss)  # a notebook cell run again
    assert registered_rules().index("every_third") == len(BUILT_IN_RULES)
    assert type(controller_running("every_third").group_rules[0]["every_third"]) is InverseLoss


def test_a_user_rule_reads_its_own_settings_and_proposes_under_its_registered_name():
    controller = controller_running("scaled", scaled={"factor": 1.5})
    gains, events = feed(controller, [2.0] * 8)
    assert gains[-1] == pytest.approx(1.5) and {event.rule for event in events} == {"scaled"}
    register_rule("scaled_again", Scaled)  # the same class under a second name: its own settings, its own name
    controller = controller_running("scaled_again", scaled={"factor": 1.5}, scaled_again={"factor": 0.5})
    gains, events = feed(controller, [2.0] * 8)
    assert gains[-1] == pytest.approx(0.5) and {event.rule for event in events} == {"scaled_again"}


def test_the_controller_names_a_proposal_after_the_rule_that_made_it():
    class Misnamed(Rule):
        def propose(self, statistics):
            return Proposal("someone_else", 1.1, "nudge", "a copied example")

    register_rule("misnamed", Misnamed)
    _, events = feed(controller_running("misnamed"), [2.0] * 8)
    assert events and {event.rule for event in events} == {"misnamed"}
