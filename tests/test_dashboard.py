"""Dashboard, run files and report: rendered content, real runs, a pseudo-terminal, the CLI."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from transformers import Trainer, TrainerCallback

from hf_r8 import R8Callback, R8Config, R8Trainer
from hf_r8.cli import main as cli_main
from hf_r8.ui.dashboard import Dashboard, DashboardView, plain_line, render, sparkline
from hf_r8.ui.run_log import EVENTS_FILE, METRICS_FILE, RUN_DIR, read_jsonl
from tests.trainer_setup import ScriptedLossModel, training_args

SCRIPTS = Path(__file__).parent / "scripts"


def _view() -> DashboardView:
    view = DashboardView(step=40, max_steps=100, loss=2.5, loss_ema=2.61, lr=2e-3, base_lr=1e-3, gain=2.0,
                         momentum=0.9, grad_norm=0.75, rollbacks=1, skipped_steps=2,
                         quartile_losses=[1.0, 2.0, 3.0, 4.0], batch_mix=[0.25, 0.25, 0.25, 0.25])
    view.losses.extend([3.0, 2.8, 2.9, 2.5])
    view.decisions.append("step 30 decision/increase: window mean fell 3.1%")
    return view


def test_render_shows_every_signal_and_the_reasons():
    console = Console(record=True, width=140, file=io.StringIO(), force_terminal=True)
    console.print(render(_view()))
    screen = console.export_text()
    for expected in ("hf_r8 · learnit::r8", "step 40/100", "steps/s", "ETA", "2.5", "(EMA 2.61)", "0.002 / 0.001",
                     "(gain 2)", "momentum", "0.9", "grad norm", "0.75", "1 / 2", "1  2  3  4", "25%  25%  25%  25%",
                     "window mean fell 3.1%", sparkline([3.0, 2.8, 2.9, 2.5])):
        assert expected in screen, expected
    assert "reward" not in screen  # rows without a value are left out


def test_sparkline_and_plain_line():
    assert sparkline([1.0, 2.0, float("nan"), 3.0]) == "▁▅█"
    assert sparkline([]) == ""
    line = plain_line(_view())
    assert line.startswith("r8 step 40/100") and "loss 2.5" in line and "rollbacks 1" in line


def test_without_a_terminal_the_dashboard_prints_throttled_lines():
    output = io.StringIO()
    dashboard = Dashboard(Console(file=output, force_terminal=False, force_jupyter=False), line_interval_s=3600)
    view = _view()
    dashboard.start(view)
    for _ in range(50):
        dashboard.update(view)  # throttled: nothing within the interval
    dashboard.stop(view)
    lines = output.getvalue().splitlines()
    assert not dashboard.interactive and len(lines) == 2
    assert lines[0].startswith("r8: training from step") and lines[1].startswith("r8 step 40/100")


def test_a_dumb_terminal_gets_plain_lines(monkeypatch):
    monkeypatch.setenv("TERM", "dumb")  # rich's Live draws nothing there until it stops
    output = io.StringIO()
    dashboard = Dashboard(Console(file=output, force_terminal=True, force_jupyter=False), line_interval_s=0.0)
    view = _view()
    dashboard.start(view)
    dashboard.announce("LR range test: skipped")
    dashboard.update(view)
    dashboard.stop(view)
    lines = output.getvalue().splitlines()
    assert not dashboard.interactive
    assert [line.split(" ")[0] for line in lines] == ["r8:", "r8:", "r8", "r8"]
    assert lines[1] == "r8: LR range test: skipped" and lines[-1].endswith("(end)")


class FilePeek(TrainerCallback):
    """Reads r8_events.jsonl while training runs: what was written is already on disk."""

    def __init__(self, path: Path, at_step: int) -> None:
        self.path, self.at_step, self.lines = path, at_step, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            self.lines = self.path.read_text().splitlines()


@pytest.mark.integration
def test_events_and_metrics_are_written_as_the_run_goes(model, lm_dataset, tmp_path):
    def one_spike(step):
        return 9.0 if step == 25 else 3.0 - 0.01 * step + 0.02 * (step % 3)

    peek = FilePeek(tmp_path / RUN_DIR / EVENTS_FILE, at_step=30)
    r8 = R8Callback(R8Config.from_preset("default"))
    trainer = Trainer(model=ScriptedLossModel(model, one_spike), args=training_args(tmp_path, max_steps=40),
                      train_dataset=lm_dataset, callbacks=[r8, peek])
    trainer.train()
    events = read_jsonl(tmp_path / RUN_DIR / EVENTS_FILE)
    assert [event["kind"] for event in events if event["step"] == 25] == ["rollback/skip_step"]
    assert json.loads(peek.lines[-1])["step"] <= 30 and len(peek.lines) >= 1  # flushed before the end
    assert all({"step", "kind", "group", "old", "new", "reason", "signals"} <= set(event) for event in events)
    rows = read_jsonl(tmp_path / RUN_DIR / METRICS_FILE, merge_by_step=True)
    assert [row["step"] for row in rows] == list(range(1, 41))  # skipped step 25 and the last step included
    assert rows[10]["loss"] == pytest.approx(one_spike(11))
    assert all(row["lr"] == pytest.approx(row["base_lr"] * row["gain"]) for row in rows)  # the gain applied
    assert len({round(row["gain"], 9) for row in rows}) > 1  # the controller acted during the run
    assert all(row["base_lr"] == pytest.approx(1e-3) for row in rows)
    report = tmp_path / RUN_DIR / "r8_report"
    assert (report / "loss.png").is_file() and (report / "summary.md").is_file()
    assert "rollback/skip_step | 1" in (report / "summary.md").read_text()


@pytest.mark.integration
def test_r8trainer_report_has_quartiles_and_the_cli_rewrites_it(model, lm_dataset, tmp_path, capsys):
    config = R8Config.from_preset("default")
    trainer = R8Trainer(model=model, args=training_args(tmp_path, max_steps=24, per_device_train_batch_size=8,
                                                        logging_steps=4), train_dataset=lm_dataset.select(range(64)),
                        r8=config)
    trainer.train()
    report = tmp_path / RUN_DIR / "r8_report"
    assert {"loss.png", "lr.png", "quartiles.png", "summary.md"} <= {path.name for path in report.iterdir()}
    assert "momentum.png" not in {path.name for path in report.iterdir()}  # no momentum rule: no empty plot
    kinds = {event["kind"] for event in read_jsonl(tmp_path / RUN_DIR / EVENTS_FILE)}
    assert "sampler/plan" in kinds
    for path in report.iterdir():
        path.unlink()
    assert cli_main(["report", str(tmp_path)]) == 0
    assert (report / "quartiles.png").is_file() and "summary.md" in capsys.readouterr().out


def test_report_on_a_folder_without_a_run_says_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="no r8_metrics.jsonl in it"):
        cli_main(["report", str(tmp_path)])


@pytest.mark.integration
def test_progress_bar_is_replaced_while_the_dashboard_runs(model, lm_dataset, tmp_path, capfd):
    args = training_args(tmp_path, max_steps=6, disable_tqdm=False)
    Trainer(model=model, args=args, train_dataset=lm_dataset, callbacks=[R8Callback()]).train()
    with_dashboard = capfd.readouterr()
    assert "r8 step 6/6" in with_dashboard.out and "6/6 [" not in with_dashboard.err  # no tqdm training bar
    config = R8Config.from_preset("default")
    config.dashboard = False
    Trainer(model=model, args=args, train_dataset=lm_dataset, callbacks=[R8Callback(config)]).train()
    without = capfd.readouterr()
    assert "6/6 [" in without.err and "r8 step" not in without.out


def _run_in_a_pseudo_terminal(tmp_path: Path, **env: str) -> str:
    """What `dashboard_run.py` (a real 30-step run) writes to a pseudo-terminal with `env`, once it has exited."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen([sys.executable, str(SCRIPTS / "dashboard_run.py"), str(tmp_path)], stdin=secondary,
                               stdout=secondary, stderr=secondary, close_fds=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env})
    os.close(secondary)
    screen = b""
    while select.select([primary], [], [], 120)[0]:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    assert process.wait(timeout=60) == 0, screen[-2000:]
    return screen.decode("utf-8", errors="replace")


@pytest.mark.integration
def test_a_real_run_in_a_pseudo_terminal_shows_the_live_dashboard(tmp_path):
    text = _run_in_a_pseudo_terminal(tmp_path, TERM="xterm-256color", COLUMNS="140", LINES="40")
    assert "hf_r8 · learnit::r8" in text and "steps/s" in text and "last decisions" in text
    assert "\x1b[" in text  # drawn with terminal control sequences (rich Live), not plain lines
    assert "r8 step " not in text  # the plain-line fallback was not used
    assert "/30 [" not in text  # no tqdm training bar fighting it


@pytest.mark.integration
def test_a_real_run_on_a_dumb_terminal_says_what_it_does(tmp_path):
    text = _run_in_a_pseudo_terminal(tmp_path, TERM="dumb")
    lines = [line for line in text.splitlines() if line.startswith("r8")]
    assert lines[0].startswith("r8: training from step 0 to 30")
    assert lines[1].startswith("r8: LR range test: skipped: a run of 30 steps is too short")
    assert lines[-1].startswith("r8 step 30/30") and lines[-1].endswith("(end)")


@pytest.mark.integration
def test_a_piped_run_says_what_the_range_test_does_and_decides(model, lm_dataset, tmp_path, capfd):
    config = R8Config.from_preset("default")
    config.range_test.steps = 6
    Trainer(model=model, args=training_args(tmp_path, max_steps=20), train_dataset=lm_dataset,
            callbacks=[R8Callback(config)]).train()
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("r8")]
    assert lines[0] == "r8: training from step 0 to 20; a line every 30 s"
    assert lines[1].startswith("r8: LR range test: sweeping gain x0.01..x100000 over 6 steps before training")
    assert lines[2].startswith("r8: LR range test: chose LR ")
    assert lines[-1].startswith("r8 step 20/20") and lines[-1].endswith("(end)")


@pytest.mark.integration
def test_a_fresh_run_starts_its_files_anew_and_a_failed_run_is_cleaned_up(model, lm_dataset, tmp_path):
    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("boom")

    r8 = R8Callback()
    failing = Trainer(model=model, args=training_args(tmp_path, max_steps=8), train_dataset=lm_dataset,
                      callbacks=[r8, Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        failing.train()
    assert not r8._outputs.live  # ended where the exception left train(), though on_train_end never ran
    Trainer(model=model, args=training_args(tmp_path, max_steps=8), train_dataset=lm_dataset, callbacks=[r8]).train()
    assert not r8._outputs.live
    rows = read_jsonl(tmp_path / RUN_DIR / METRICS_FILE)
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 9))  # this run's rows only
    # The failed run's rows are kept apart, not overwritten, and a third run keeps the second's.
    previous = read_jsonl(tmp_path / RUN_DIR / "previous" / "run-1" / METRICS_FILE)
    assert [row["step"] for row in previous if "loss" in row] == [1, 2, 3]
    Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=lm_dataset, callbacks=[r8]).train()
    second = read_jsonl(tmp_path / RUN_DIR / "previous" / "run-2" / METRICS_FILE)
    assert [row["step"] for row in second if "loss" in row] == list(range(1, 9))


def test_a_dashboard_that_cannot_write_warns_once_and_turns_itself_off(caplog):
    # The kernel's always-full device, written through (no buffer to hide it): every write gets ENOSPC.
    with io.TextIOWrapper(open("/dev/full", "wb", buffering=0), write_through=True) as full:
        dashboard = Dashboard(console=Console(file=full, force_terminal=False), line_interval_s=0.0)
        view = DashboardView(step=1, max_steps=10)
        with caplog.at_level("WARNING"):
            dashboard.start(view)
            for step in range(2, 6):
                view.step = step
                dashboard.update(view, force=True)
            dashboard.stop(view)
    assert dashboard.failed
    assert sum("dashboard is off" in record.getMessage() for record in caplog.records) == 1
