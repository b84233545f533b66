"""R8Config: presets, YAML, and clear errors for bad input at construction time."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_r8.config import DecisionConfig, MomentumConfig, R8Config, available_presets


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
        ({"rules": ["decision", "warp"]}, r"rules=\['decision', 'warp'\]: must be a list of distinct names"),
        ({"decision": {"patience_windows": 0}}, r"decision.patience_windows=0: must be an integer >= 1"),
        ({"exploration": {"sigma_init": 1.0}}, r"exploration.sigma_init=1.0: must be in"),
        ({"blend": {"weights": {"nope": 1.0}}}, r"blend.weights='nope'"),
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
    from hf_r8.config_reference import config_reference

    committed = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == config_reference(), "regenerate: hf-r8 config-reference > docs/configuration.md"
    rows = [line for line in committed.splitlines() if line.startswith("| `")]
    assert len(rows) > 100 and not [row for row in rows if row.endswith("|  |")]  # every field documented
