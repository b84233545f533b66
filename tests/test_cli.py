"""`hf-r8` commands, the demo, and the offline fallback of Hub loading."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
from rich.console import Console

from hf_r8.cli import main
from hf_r8.config import available_presets
from hf_r8.demo import DemoSettings, run_demo
from hf_r8.offline import load_hub_or_offline


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


@pytest.mark.integration
def test_demo_trains_and_reports(tmp_path):
    console = Console(record=True, width=200)
    summary = run_demo(DemoSettings(steps=30, batch_size=4, output_dir=str(tmp_path)), console=console)
    text = console.export_text()
    assert "R8 decisions (parameter group 0)" in text and "Training log with R8" in text
    assert summary["r8_eval_loss"] < 8.0 and summary["baseline_eval_loss"] < 8.0 and summary["final_lr_gain"] > 0
