"""`hf-r8` commands, the demo, and the offline fallback of Hub loading."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
from rich.console import Console

from hf_r8.cli import main
from hf_r8.config import available_presets
from hf_r8.demo import DemoSettings, run_demo
from hf_r8.offline import hub_offline, hub_reachable, load_hub_or_offline


def test_presets_command_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in available_presets())


def test_hub_loading_falls_back_offline_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, tokenizer, source = load_hub_or_offline("gpt2")
    assert source == "offline:tiny-gpt2"
    assert model.config.vocab_size == len(tokenizer)


def test_unreachable_hub_is_put_in_offline_mode_for_the_block(monkeypatch):
    import datasets.config

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert not hub_reachable()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with hub_offline():
        assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert not huggingface_hub.constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE


@pytest.mark.integration
def test_demo_falls_back_offline_compares_with_cosine_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    console = Console(record=True, width=200)
    settings = DemoSettings(steps=8, model_size="tiny", batch_size=4, seq_len=64, compare=True, dashboard=False,
                            output_dir=str(tmp_path))
    summary = run_demo(settings, console=console)
    text = console.export_text()
    assert "offline: the Hub is unreachable" in text  # one line, then the fallback
    assert "cosine (stock Trainer)" in text and "hf_r8 (default)" in text
    assert 0 < summary["r8_eval_loss"] < 9.5 and 0 < summary["cosine_eval_loss"] < 9.5
    assert summary["rollbacks"] == 0 and summary["final_lr_gain"] > 0
    assert {"loss.png", "lr.png", "summary.md"} <= {path.name for path in (tmp_path / "r8_report").iterdir()}


def test_demo_rejects_an_unknown_model_size():
    with pytest.raises(ValueError, match="model_size must be one of"):
        run_demo(DemoSettings(model_size="huge"))
