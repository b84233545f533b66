"""R8Config: presets, YAML, and clear errors for bad input at construction time and when a config is used."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from hf_r8.control.config import SECTIONS, DecisionConfig, MomentumConfig, R8Config, available_presets


def test_every_documented_preset_ships_and_loads():
    shipped = {"default", "gentle", "conservative", "aggressive", "reward_rl", "moe", "find_lr"}
    assert shipped <= set(available_presets())
    for name in available_presets():
        config = R8Config.from_preset(name)
        assert R8Config.from_dict(config.to_dict()) == config


def test_presets_differ_where_they_should():
    assert R8Config.from_preset("moe").moe.enabled
    reward_rl = R8Config.from_preset("reward_rl")
    assert "trend" in reward_rl.reward.rules and not reward_rl.rollback.enabled and not R8Config().reward.rules
    assert R8Config.from_preset("conservative").decision.increase_factor < R8Config().decision.increase_factor
    assert R8Config().range_test.enabled and R8Config().anneal.enabled
    assert R8Config.from_preset("find_lr").range_test.steps == 30 and R8Config().range_test.steps is None
    gentle = R8Config.from_preset("gentle")
    assert not gentle.range_test.enabled and not gentle.anneal.enabled and gentle.rules == R8Config().rules


def test_yaml_with_base_preset_overrides_only_what_it_names(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: moe\ndecision:\n  patience_windows: 5\n")
    config = R8Config.from_yaml(path)
    assert config.decision.patience_windows == 5
    assert config.moe.enabled
    assert config.decision.increase_factor == R8Config.from_preset("moe").decision.increase_factor


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"decision": {"increase_factor": 0.9}}, r"decision.increase_factor=0.9: must be > 1"),
        ({"decision": {"decrease_factor": 1.5}}, r"decision.decrease_factor=1.5: must be in \(0.0, 1.0\)"),
        ({"signals": {"window": 1}}, r"signals.window=1: must be an integer >= 2"),
        ({"momentum": {"rule": "nesterov"}}, r"momentum.rule='nesterov': must be one of"),
        ({"momentum": {"max": 1.0}}, r"momentum.max=1.0: must be in \[0.0, 1.0\)"),
        ({"bounds": {"lr_min": 1e-3, "lr_max": 1e-4}}, r"bounds.lr_max=0.0001: must be > bounds.lr_min"),
        ({"reward": {"rules": ["bogus"]}}, r"reward.rules=\['bogus'\]"),
        ({"rules": ["decision", "decision"]}, r"rules=\['decision', 'decision'\]: must be a list of distinct rule"),
        ({"decision": {"patience_windows": 0}}, r"decision.patience_windows=0: must be an integer >= 1"),
        ({"exploration": {"sigma_init": 1.0}}, r"exploration.sigma_init=1.0: must be in"),
        ({"blend": {"weights": {"trend": -1.0}}}, r"blend.weights.trend=-1.0: must be >= 0"),
        ({"rule_settings": {"mine": 3}}, r"rule_settings=\{'mine': 3\}: must be a mapping of rule name -> mapping"),
        ({"decision": {"stability_threshold": 0.6}}, r"decision.instability_threshold=0.5: must be > stability"),
    ],
)
def test_out_of_range_values_name_the_field_and_the_allowed_range(data, message):
    with pytest.raises(ValueError, match=message):
        R8Config.from_dict(data)


def test_unknown_keys_are_rejected_with_the_allowed_keys():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['decision.increse_factor'\]"):
        R8Config.from_dict({"decision": {"increse_factor": 1.2}})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        R8Config.from_dict({"learning_rate": 1e-3})


def test_sections_validate_when_built_in_code():
    with pytest.raises(ValueError, match="decision.spike_factor=0: must be in"):
        DecisionConfig(spike_factor=0)
    with pytest.raises(ValueError, match="momentum.max=0.1: must be >= momentum.min"):
        MomentumConfig(min=0.5, max=0.1)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"preset='fast': must be one of \['aggressive'"):
        R8Config.from_preset("fast")


def test_configuration_reference_is_generated_from_the_dataclasses_and_committed():
    from hf_r8.control.config_reference import config_reference

    committed = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == config_reference(), "regenerate: hf-r8 config-reference > docs/configuration.md"
    rows = [line for line in committed.splitlines() if line.startswith("| `")]
    assert len(rows) > 100 and not [row for row in rows if row.endswith("|  |")]  # every field documented


def test_every_field_carries_its_help_as_field_metadata():
    # the reference writes the help verbatim into one table row: it must exist and be a single clean line
    owners = [R8Config, *SECTIONS.values()]
    fields = [spec for owner in owners for spec in dataclasses.fields(owner) if spec.name not in SECTIONS]
    assert len(fields) > 100
    for spec in fields:
        text = spec.metadata.get("help")
        assert isinstance(text, str) and text.strip() == text and text == " ".join(text.split()), spec.name


def test_validate_checks_fields_assigned_after_construction():
    config = R8Config.from_preset("default")
    config.decision.patience_windows = "three"
    with pytest.raises(TypeError, match=re.escape("decision.patience_windows='three': must be an integer")):
        config.validate()
    config.decision.patience_windows = 0
    with pytest.raises(ValueError, match=re.escape("decision.patience_windows=0: must be an integer >= 1")):
        config.validate()
    config.decision.patience_windows = "3"  # a numeric string passes, as at construction, and is stored as a number
    config.bounds.lr_min = np.float32(0.5)
    config.validate()
    assert config.decision.patience_windows == 3 and type(config.decision.patience_windows) is int
    assert type(config.bounds.lr_min) is float
    assert config == R8Config.from_dict(config.to_dict())


def test_validate_catches_in_place_changes_and_replaced_sections():
    config = R8Config()
    config.rules.append("decision")  # no assignment at all: only a check when the config is used can see this
    with pytest.raises(ValueError, match=re.escape("rules=['decision', 'grad_norm', 'decision']: must be a list")):
        config.validate()
    config = R8Config()
    config.blend.weights["trend"] = math.nan
    with pytest.raises(ValueError, match="blend.weights.trend=nan: must be >= 0"):
        config.validate()
    config = R8Config()
    config.rollback = {"enabled": False}
    with pytest.raises(TypeError, match=re.escape("rollback={'enabled': False}: must be a RollbackConfig")):
        config.validate()
    section = DecisionConfig()
    section.spike_factor = 1.5
    with pytest.raises(ValueError, match=re.escape("decision.spike_factor=1.5: must be in (0.0, 1.0)")):
        R8Config(decision=section)  # a section changed before it is handed over is checked again


def test_cross_field_checks_see_the_fields_together_whatever_the_assignment_order():
    config = R8Config()
    config.decision.stability_threshold = 0.6  # above instability_threshold (0.5) until the next line
    config.decision.instability_threshold = 0.9
    config.validate()
    config.decision.instability_threshold = 0.4
    with pytest.raises(ValueError, match=r"decision.instability_threshold=0.4: must be > stability_threshold \(0.6\)"):
        config.validate()


def test_rule_names_are_resolved_when_hf_r8_takes_the_config_so_a_yaml_may_name_a_rule_registered_later(
        monkeypatch, tmp_path):
    from hf_r8.control.resolve import resolve_config
    from hf_r8.control.rule_registry import RULES, register_rule
    from hf_r8.control.rules import Rule

    class Mine(Rule):
        def propose(self, statistics):
            return None

    path = tmp_path / "mine.yaml"
    path.write_text("rules: [decision, mine]\nblend:\n  weights: {mine: 2.0}\nrule_settings:\n  mine: {below: 0.5}\n")
    config = R8Config.from_yaml(path)  # loads before the rule is registered
    with pytest.raises(ValueError, match=r"rules: 'mine' is not registered: must be one of \['decision', .*\] \(add "
                                         r"one with hf_r8.control.rule_registry.register_rule\)"):
        resolve_config(config)  # what an adapter does when it takes the config
    monkeypatch.setattr(RULES, "_classes", dict(RULES._classes))  # the registration ends with the test
    register_rule("mine", Mine)
    assert resolve_config(path).blend.weights == {"mine": 2.0}
    config.blend.weights["theirs"] = 1.0
    with pytest.raises(ValueError, match=r"blend.weights names \['theirs'\]: each must be a rule name from"):
        resolve_config(config)


def _fields_of_type(*annotations: str) -> list[tuple[str, str]]:
    """(section, field) for every field annotated as one of `annotations`; section "" is the top level."""
    owners = [("", R8Config), *SECTIONS.items()]
    return [(section, spec.name) for section, owner in owners for spec in dataclasses.fields(owner)
            if spec.type in annotations]


def _set(section: str, name: str, value: object) -> dict:
    return {section: {name: value}} if section else {name: value}


BOOL_FIELDS = _fields_of_type("bool")
FLOAT_FIELDS = _fields_of_type("float", "float | None")


def test_the_field_lists_cover_what_the_issue_names():
    # the parametrized tests below would prove nothing if the annotations stopped matching
    assert {("sampler", "enabled"), ("rollback", "enabled"), ("exploration", "enabled"), ("range_test", "enabled"),
            ("anneal", "enabled"), ("", "dashboard"), ("", "run_files"), ("", "report")} <= set(BOOL_FIELDS)
    assert ("bounds", "lr_min") in FLOAT_FIELDS and len(FLOAT_FIELDS) > 50


@pytest.mark.parametrize(("section", "name"), BOOL_FIELDS)
@pytest.mark.parametrize("value", ["false", 0, None])
def test_every_boolean_field_refuses_anything_but_a_boolean(section, name, value):
    prefix = f"{section}." if section else ""
    with pytest.raises(TypeError, match=re.escape(f"{prefix}{name}={value!r}: must be a boolean")):
        R8Config.from_dict(_set(section, name, value))


def test_numpy_booleans_are_stored_as_plain_booleans():
    config = R8Config.from_dict({"sampler": {"enabled": np.bool_(False)}, "report": np.bool_(False)})
    assert config.sampler.enabled is False and config.report is False


@pytest.mark.parametrize(("section", "name"), FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_no_float_field_lets_a_non_finite_value_through(section, name, value):
    prefix = f"{section}." if section else ""
    with pytest.raises(ValueError, match=re.escape(f"{prefix}{name}={value!r}: must be")):
        R8Config.from_dict(_set(section, name, value))


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_sampler_proportions_are_refused(value):
    with pytest.raises(ValueError, match=r"sampler.proportions=\[(inf|nan), 1, 1, 1\]: must be a list of 4 finite"):
        R8Config.from_dict({"sampler": {"proportions": [value, 1, 1, 1]}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"moe": {"router_patterns": "gate"}}, r"moe.router_patterns='gate': must be a list of strings"),
        ({"moe": {"router_patterns": ["gate", 3]}}, r"moe.router_patterns=\['gate', 3\]: must be a list of strings"),
        ({"reward": {"rules": "trend"}}, r"reward.rules='trend': must be a list of strings"),
        ({"reward": {"rules": None}}, r"reward.rules=None: must be a list of strings"),
        ({"rules": "decision"}, r"rules='decision': must be a list of strings"),
        ({"sampler": {"proportions": "0.25"}}, r"sampler.proportions='0.25': must be a list of numbers"),
        ({"sampler": {"proportions": [True, 1, 1, 1]}}, r"sampler.proportions=\[True, 1, 1, 1\]: must be a list"),
        ({"blend": {"weights": None}}, r"blend.weights=None: must be a mapping of names to numbers"),
        ({"blend": {"weights": [1.0]}}, r"blend.weights=\[1.0\]: must be a mapping of names to numbers"),
        ({"blend": {"weights": {"decision": "heavy"}}}, r"blend.weights=\{'decision': 'heavy'\}: must be a mapping"),
        ({"bounds": {"lr_min": True}}, r"bounds.lr_min=True: must be a number or null"),
        ({"bounds": {"lr_min": "small"}}, r"bounds.lr_min='small': must be a number or null"),
        ({"decision": {"increase_factor": [1.2]}}, r"decision.increase_factor=\[1.2\]: must be a number"),
        ({"decision": {"patience_windows": "3.5"}}, r"decision.patience_windows='3.5': must be an integer"),
        ({"decision": {"patience_windows": 3.0}}, r"decision.patience_windows=3.0: must be an integer"),
        ({"decision": {"patience_windows": True}}, r"decision.patience_windows=True: must be an integer"),
        ({"warmup_steps": "ten"}, r"warmup_steps='ten': must be an integer or null"),
        ({"rollback": 3}, r"rollback=3: must be a mapping of RollbackConfig fields"),
        ({"rollback": ["enabled"]}, r"rollback=\['enabled'\]: must be a mapping of RollbackConfig fields"),
    ],
)
def test_wrong_types_and_shapes_are_named_with_the_expected_type(data, message):
    with pytest.raises(TypeError, match=message):
        R8Config.from_dict(data)


def test_numeric_strings_and_numpy_scalars_are_stored_as_plain_numbers(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("bounds:\n  lr_min: 1e-5\n")  # PyYAML reads 1e-5 (no dot) as a string
    assert R8Config.from_yaml(path).bounds.lr_min == 1e-5
    config = R8Config.from_dict({
        "warmup_steps": "7",
        "decision": {"patience_windows": np.int64(3), "increase_factor": np.float32(1.25), "spike_z": "4"},
        "sampler": {"proportions": [np.float64(0.1), "0.2", np.int32(3), 0.4]},
        "blend": {"weights": {"decision": np.float32(0.5), "grad_norm": "2"}},
    })
    assert config.warmup_steps == 7 and config.decision.patience_windows == 3 and config.decision.spike_z == 4.0
    assert config.decision.increase_factor == 1.25 and config.sampler.proportions == [0.1, 0.2, 3.0, 0.4]
    assert config.blend.weights == {"decision": 0.5, "grad_norm": 2.0}
    plain = (bool, int, float, str, list, dict, type(None))
    values = [config.warmup_steps, config.decision.patience_windows, config.decision.increase_factor,
              *config.sampler.proportions, *config.blend.weights.values()]
    assert all(type(value) in plain for value in values)
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert R8Config(rules=("decision",)).rules == ["decision"]  # a tuple from code is stored as a list
    assert R8Config.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


def test_a_null_section_means_its_defaults_or_the_base_presets_values(tmp_path):
    assert R8Config.from_dict({"rollback": None}) == R8Config()
    path = tmp_path / "mine.yaml"
    path.write_text("rollback:\nsampler:\n")
    assert R8Config.from_yaml(path) == R8Config()
    path.write_text("base: reward_rl\nrollback:\n")
    assert R8Config.from_yaml(path) == R8Config.from_preset("reward_rl")
    assert not R8Config.from_preset("reward_rl").rollback.enabled  # else the base case proves nothing
