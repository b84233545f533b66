"""What a Trainer run with R8 shows and leaves behind: the events, the dashboard, the run files, the report.

`RunOutputs` logs each event the engine records and, on the main process, feeds the live
dashboard (`ui/dashboard.py`, muting the tqdm bar it replaces) and the run files (`ui/run_log.py`); at the
end of a run it writes the report (`ui/report.py`). All of it is observability: none of it changes what
is trained, and an OS error in any of it turns that output off with a warning.
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerState, TrainingArguments

from hf_r8.control.controller import Observation
from hf_r8.control.decision import Decision
from hf_r8.control.events import Event
from hf_r8.integrations.compat import mute_training_bar
from hf_r8.ui.dashboard import Dashboard, DashboardView, show_event
from hf_r8.ui.run_log import RUN_DIR, RunLog

logger = logging.getLogger(__name__)

_QUARTILE_KEYS = ("q1_loss", "q2_loss", "q3_loss", "q4_loss")


class RunOutputs:
    """The outputs of a Trainer run: the log lines, the dashboard, the run files and the report."""

    def __init__(self, run_files: bool, dashboard: bool, report: bool) -> None:
        self.view: DashboardView | None = None
        self._wants = {"run_files": run_files, "dashboard": dashboard, "report": report}
        self._dashboard: Dashboard | None = None
        self._run_log: RunLog | None = None
        self._unmute_progress: Callable[[], None] | None = None
        self._elapsed_before = 0.0
        self._events_since_log = 0
        self._decision_since_log = 0

    @property
    def live(self) -> bool:
        """Whether the dashboard is drawing or the run files are open."""
        return self._dashboard is not None or self._run_log is not None

    @property
    def rows_written(self) -> list[int] | None:
        """The run files' row counts, saved with each checkpoint (None off the main process)."""
        return list(self._run_log.rows_written) if self._run_log is not None else None

    def open(self, args: TrainingArguments, state: TrainerState, callbacks: list[Any],
             kept_rows: list[int] | None) -> None:
        """Start the view (every process) and, on the main process, the run files and the dashboard."""
        self.close()  # a previous run that raised never reached on_train_end
        self._elapsed_before = 0.0
        self.view = DashboardView(step=state.global_step, max_steps=state.max_steps, first_step=state.global_step)
        if not state.is_world_process_zero:
            return
        if self._wants["run_files"] and args.output_dir:
            self._run_log = RunLog(Path(args.output_dir) / RUN_DIR, resume_step=state.global_step,
                                   kept_rows=tuple(kept_rows) if kept_rows else None)
            self._elapsed_before = self._run_log.elapsed_before
        if self._wants["dashboard"]:
            self._dashboard = Dashboard()
            if not self._dashboard.notebook:  # a notebook without ipywidgets keeps its live bar (see dashboard.py)
                self._unmute_progress = mute_training_bar(callbacks)
            self._dashboard.start(self.view)
            # The dashboard's own stop, not this object's: atexit must not keep the callback and its model alive.
            atexit.register(self._dashboard.stop, self.view)

    def record(self, event: Event, signals: dict[str, float]) -> None:
        """Log `event`, and write it to r8_events.jsonl (with the controller's `signals`) and the view."""
        if self._run_log is not None:
            self._run_log.event({"step": event.step, "kind": f"{event.rule}/{event.action}", "group": event.group,
                                 "old": event.old_value, "new": event.new_value, "reason": event.reason,
                                 "signals": signals})
        if self.view is not None:
            show_event(self.view, self._dashboard, event)
        self._events_since_log += 1
        if event.rule == "decision" and event.group == 0:
            self._decision_since_log = Decision(event.action).code
        logger.info("r8 step %d group %d %s: %s -> %s (%s)", event.step, event.group, event.action,
                    f"{event.old_value:.4g}", f"{event.new_value:.4g}", event.reason)

    def record_step(self, observation: Observation, used: tuple[float | None, float | None, float | None],
                    extras: dict[str, float | None]) -> None:
        """One step's row of r8_metrics.jsonl and the view: the LR the step used, the schedule's and the gain
        (`used`), its loss and gradient norm, and the controller's `extras` (momentum, loss EMA, ...)."""
        lr, base_lr, gain = used
        row = {"step": observation.step, "loss": observation.loss, "grad_norm": observation.grad_norm, "lr": lr,
               "base_lr": base_lr, "gain": gain, "momentum": extras.pop("momentum"),
               "loss_ema": extras.pop("loss_ema")}
        if observation.reward is not None:
            row["reward"] = observation.reward
        row.update(extras)
        view = self.view
        if view is not None:
            row["elapsed_s"] = self._elapsed_before + time.monotonic() - view.started
            view.loss, view.loss_ema, view.grad_norm = observation.loss, row["loss_ema"], observation.grad_norm
            view.lr, view.base_lr, view.gain, view.momentum = lr, base_lr, gain, row["momentum"]
            if observation.reward is not None:
                view.reward = observation.reward
            if observation.loss is not None:
                view.losses.append(observation.loss)
        if self._run_log is not None:
            self._run_log.metrics(row)

    def step_end(self, step: int, rollbacks: int, skipped_steps: int) -> None:
        if self.view is None:
            return
        self.view.step, self.view.rollbacks, self.view.skipped_steps = step, rollbacks, skipped_steps
        if self._dashboard is not None:
            self._dashboard.update(self.view)

    def read_logs(self, step: int, logs: dict[str, float] | None, batch_mix: list[float] | None) -> None:
        """The catalog's quartile losses R8Trainer logged (and its batch mix) to the view and the run files."""
        quartiles = [logs[f"r8/{key}"] for key in _QUARTILE_KEYS if f"r8/{key}" in (logs or {})]
        if self.view is not None and quartiles:
            self.view.quartile_losses = quartiles
            if batch_mix is not None:
                self.view.batch_mix = batch_mix
        if self._run_log is not None:
            if len(quartiles) == len(_QUARTILE_KEYS):
                self._run_log.metrics({"step": step, **dict(zip(_QUARTILE_KEYS, quartiles, strict=True))})
            self._run_log.flush()

    def log_counts(self) -> dict[str, float]:
        """The events, and the last decision's code, since the previous Trainer log (so none is missed)."""
        counts = {"decision": float(self._decision_since_log), "events": float(self._events_since_log)}
        self._events_since_log = self._decision_since_log = 0
        return counts

    def range_test_status(self, line: str) -> None:
        """What the LR range test does in this run (its sweep, or why there is none), shown at once."""
        if self.view is not None:
            self.view.range_test = line
        if self._dashboard is not None:
            self._dashboard.announce(f"LR range test: {line}")

    def range_test_done(self, record: dict[str, Any], line: str) -> None:
        if self._run_log is not None:
            self._run_log.range_test(record)
        self.range_test_status(line)

    def flush(self) -> None:
        if self._run_log is not None:
            self._run_log.flush()

    def close(self, progress_bar_unmutes_itself: bool = False) -> None:
        """Stop the dashboard and close the run files now (the end of a run, also one that raised)."""
        if self._dashboard is not None:
            atexit.unregister(self._dashboard.stop)
            self._dashboard.stop(self.view)
            self._dashboard = None
        if self._unmute_progress is not None and not progress_bar_unmutes_itself:
            self._unmute_progress()
        self._unmute_progress = None
        if self._run_log is not None:
            self._run_log.close()
            self._run_log = None

    def finish(self, output_dir: str) -> None:
        """The end of a run: close everything (the progress bar's own on_train_end, next, unmutes it) and write
        the report from the run files, if they were written."""
        wrote_files = self._run_log is not None and not self._run_log.failed
        self.close(progress_bar_unmutes_itself=True)
        if not (wrote_files and self._wants["report"]):
            return
        from hf_r8.ui.report import write_report

        try:
            written = write_report(output_dir)
            logger.info("R8 report: %s", written[-1])
        except Exception as error:  # the run is done and saved; a failed plot must not lose it
            logger.warning("R8 report could not be written: %s", error)
