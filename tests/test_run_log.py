"""The run files in `<output_dir>/r8/`: written as the run goes, exact across a resume, and never a reason for
training to fail (a full disk, an output dir R8 cannot write into)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import Trainer

from hf_r8 import R8Callback
from hf_r8.demo.offline import tiny_gpt2
from hf_r8.ui.run_log import EVENTS_FILE, METRICS_FILE, RUN_DIR, read_jsonl, run_files_dir
from tests.trainer_setup import training_args

pytestmark = pytest.mark.integration


def _train(model, dataset, output_dir: Path, **args) -> Trainer:
    resume = args.pop("resume", None)
    trainer = Trainer(model=model, args=training_args(output_dir, **args),
                      train_dataset=dataset, callbacks=[R8Callback.from_preset("aggressive")])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_everything_r8_writes_is_in_one_subfolder(model, lm_dataset, tmp_path):
    _train(model, lm_dataset, tmp_path, max_steps=8, save_strategy="steps", save_steps=4)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-8", RUN_DIR]
    assert {EVENTS_FILE, METRICS_FILE, "r8_report"} <= {path.name for path in (tmp_path / RUN_DIR).iterdir()}
    assert run_files_dir(tmp_path) == tmp_path / RUN_DIR


def test_a_full_disk_turns_the_run_files_off_and_training_goes_on(model, lm_dataset, tmp_path, caplog):
    folder = tmp_path / RUN_DIR
    folder.mkdir()
    for name in (EVENTS_FILE, METRICS_FILE):  # the kernel's always-full device: every write gets ENOSPC
        os.symlink("/dev/full", folder / name)
    with caplog.at_level("WARNING"):
        trainer = _train(model, lm_dataset, tmp_path, max_steps=30)
    assert trainer.state.global_step == 30
    warnings = [record.getMessage() for record in caplog.records if "run files are off" in record.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert not (folder / "r8_report").exists()  # no report from files that could not be written


def test_an_output_dir_r8_cannot_write_into_leaves_training_alone(model, lm_dataset, tmp_path, caplog):
    (tmp_path / RUN_DIR).write_text("a file where R8's folder would go")
    with caplog.at_level("WARNING"):
        trainer = _train(model, lm_dataset, tmp_path, max_steps=6)
    assert trainer.state.global_step == 6
    assert sum("run files are off" in record.getMessage() for record in caplog.records) == 1


def test_resuming_after_a_kill_keeps_each_row_once_and_complete(tokenizer, lm_dataset, tmp_path):
    def fresh_model():
        return tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64, seed=1)

    common = dict(max_steps=20, save_strategy="steps", save_steps=10, learning_rate=3e-3, warmup_steps=4,
                  lr_scheduler_type="linear")
    _train(fresh_model(), lm_dataset, tmp_path / "clean", **common)
    # The killed run went on past its checkpoint; its files hold rows the resumed run is about to redo.
    _train(fresh_model(), lm_dataset, tmp_path / "killed", **common)
    _train(fresh_model(), lm_dataset, tmp_path / "killed", resume=str(tmp_path / "killed" / "checkpoint-10"),
           **common)

    def events(run):
        return [(event["step"], event["kind"], event["group"]) for event in read_jsonl(tmp_path / run / RUN_DIR /
                                                                                        EVENTS_FILE)]

    assert any(step == 10 for step, _, _ in events("clean")), "no event at the checkpoint's step: proves nothing"
    assert events("killed") == events("clean")
    rows = read_jsonl(tmp_path / "killed" / RUN_DIR / METRICS_FILE)
    assert [row["step"] for row in rows if "lr" in row] == list(range(1, 21))
    assert all(row["lr"] is not None and row["base_lr"] is not None for row in rows if "lr" in row)
    assert all(row["gain"] is not None for row in rows if row.get("base_lr"))  # warmup's LR 0 has no gain


def test_the_report_reads_runs_written_before_the_subfolder(model, lm_dataset, tmp_path):
    _train(model, lm_dataset, tmp_path, max_steps=6)
    for path in (tmp_path / RUN_DIR).glob("r8_*.json*"):
        path.rename(tmp_path / path.name)  # the layout of older hf_r8 versions
    assert run_files_dir(tmp_path) == tmp_path
    assert json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[0])["step"] == 1


def test_metrics_reach_the_disk_within_the_flush_interval_without_a_log_or_save(tmp_path, monkeypatch):
    from hf_r8.ui import run_log

    log = run_log.RunLog(tmp_path)
    log.metrics({"step": 1, "loss": 1.0})
    assert (tmp_path / METRICS_FILE).read_text() == ""  # buffered: one line per step costs no write
    monkeypatch.setattr(run_log, "FLUSH_SECONDS", 0.0)  # the interval has passed
    log.metrics({"step": 2, "loss": 0.9})
    assert [row["step"] for row in read_jsonl(tmp_path / METRICS_FILE)] == [1, 2]
    log.close()
