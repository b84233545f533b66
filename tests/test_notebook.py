"""The GPT-2 WikiText notebook runs top to bottom (offline, a few steps), as CI's check that it still works."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "gpt2_wikitext.ipynb"


def test_the_committed_outputs_show_the_current_default():
    """The committed outputs were made by this version of hf_r8 with this default preset: a changed default (or a
    version bumped for changed behaviour) must re-execute the notebook (`make notebook`)."""
    import hf_r8
    from hf_r8.control.config import preset_digest

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    text = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs)
    made_with = re.search(r"hf_r8 (\S+), default preset (\w+)", text)
    assert made_with is not None, "the notebook's outputs do not say what made them: run `make notebook`"
    assert made_with.groups() == (hf_r8.__version__, preset_digest("default")), (
        f"the notebook's outputs were made by hf_r8 {made_with[1]} with default preset {made_with[2]}; this is "
        f"{hf_r8.__version__} with {preset_digest('default')}: run `make notebook` and commit it")


def test_notebook_executes_with_tiny_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_R8_NOTEBOOK_STEPS", "6")
    monkeypatch.setenv("HF_R8_NOTEBOOK_MODEL_SIZE", "tiny")
    monkeypatch.setenv("HF_R8_NOTEBOOK_OUTPUT", str(tmp_path / "run"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") + str(output.get("data", {}).get("text/plain", "")) for output in outputs)
    assert "held-out loss" in text and "rejected: decision.increase_factor=0.5" in text
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 2  # the report's plots, inline
    assert (tmp_path / "run" / "r8" / "r8_events.jsonl").is_file()


TRAINING_CELL = """
import time
from transformers import Trainer, TrainerCallback, TrainingArguments
from hf_r8 import R8Callback, R8Config
from hf_r8.demo.offline import build_tokenizer, language_modeling_dataset, tiny_gpt2

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.05)

class Ended(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        print("TRAINING ENDED")

tokenizer = build_tokenizer(512)
dataset = language_modeling_dataset(tokenizer, seq_len=32, max_examples=64)
args = TrainingArguments(output_dir=OUTPUT, max_steps=30, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, save_strategy="no", logging_steps=5)
trainer = Trainer(model=tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64), args=args,
                  train_dataset=dataset, callbacks=[R8Callback(R8Config(run_files=False, report=False)), Slow(),
                                                    Ended()])
trainer.train()
"""


def test_a_notebook_run_shows_progress_while_it_trains(tmp_path):
    """In a real kernel (no ipywidgets, as on most fresh installs): output must appear before training ends."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(f"OUTPUT = {str(tmp_path / 'run')!r}\n" + TRAINING_CELL)]
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = notebook.cells[0].outputs
    assert not [output for output in outputs if output.output_type == "error"]

    def text(output):
        return output.get("text", "") + "".join(str(value) for value in output.get("data", {}).values())

    ended = next(index for index, output in enumerate(outputs) if "TRAINING ENDED" in text(output))
    before_end = [text(output) for output in outputs[:ended]]
    assert any("r8 step" in chunk for chunk in before_end), before_end  # R8's panel, while training runs
    assert any("<progress" in chunk for chunk in before_end), before_end  # the Trainer's own notebook bar
