"""The run's record on disk, in `<output_dir>/r8/` next to the Trainer's checkpoints (main process only).

* `r8_events.jsonl`: one JSON object per decision, skip, rollback or sampler plan —
  `{"step", "kind", "group", "old", "new", "reason", "signals"}` — flushed line by line, so a
  crash loses nothing written before it.
* `r8_metrics.jsonl`: per-step series `{"step", "loss", "grad_norm", "lr", "base_lr", "gain", ...}`,
  buffered and flushed at each Trainer log, save, at the end and at least every `FLUSH_SECONDS`
  (cheap: one line per step). Rows for the same step (a log step adds the catalog's quartile losses)
  are merged by the reader.
* `r8_range_test.json`: the LR range test's curve (gain, loss), its denoised form and the gain chosen,
  written when the test ends.

Everything R8 writes lives in that one subfolder, so scripts that count `checkpoint-*` entries in the
output dir see only the Trainer's own. A fresh run (step 0) starts the files anew, after moving a previous
run's into `previous/run-N/` (N = 1, 2, ...: a second `train()` in the same output dir loses nothing). A resumed run
keeps exactly the rows written up to its checkpoint (`rows_written`, saved in the checkpoint), drops
what came after (a crashed run's last steps, about to be redone) and appends. A line cut short by a
crash (or any malformed row) is skipped by `read_jsonl`. Non-finite numbers are written as null
(strict JSON, readable by any tool).

The files are observability, not training: an OS error while writing them (a full disk, a read-only
output dir) logs one warning and turns them off; training goes on.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

RUN_DIR = "r8"
EVENTS_FILE = "r8_events.jsonl"
METRICS_FILE = "r8_metrics.jsonl"
RANGE_TEST_FILE = "r8_range_test.json"
PREVIOUS_DIR = "previous"
FLUSH_SECONDS = 5.0

_Method = TypeVar("_Method", bound=Callable[..., None])


def run_files_dir(output_dir: str | Path) -> Path:
    """Where a run in `output_dir` keeps its R8 files: `output_dir/r8/`, or `output_dir` itself for runs
    written before the subfolder existed."""
    output_dir = Path(output_dir)
    if not (output_dir / RUN_DIR / METRICS_FILE).is_file() and (output_dir / METRICS_FILE).is_file():
        return output_dir
    return output_dir / RUN_DIR


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def _off_on_os_error(method: _Method) -> _Method:
    """Run `method` unless the run files are off; an OS error turns them off with one warning."""

    @functools.wraps(method)
    def guarded(self: RunLog, *args: Any, **kwargs: Any) -> None:
        if self.failed or self.closed:
            return
        try:
            method(self, *args, **kwargs)
        except OSError as error:
            self.failed = True
            logger.warning("R8 run files are off from now on: writing to %s failed (%s). Training goes on; "
                           "the report for this run is skipped.", self.folder, error)
            for handle in (self._events, self._metrics):
                try:
                    if handle is not None:
                        handle.close()
                except OSError:  # its buffer cannot be written either
                    pass

    return guarded  # type: ignore[return-value]


class RunLog:
    """Writes `folder/r8_events.jsonl` and `folder/r8_metrics.jsonl` for a run starting at `resume_step`.

    `kept_rows` (events, metrics), the `rows_written` saved with the checkpoint resumed from, says how
    many rows of each file belong to the run before `resume_step`; without it (a checkpoint from an older
    hf_r8) rows are kept by their step.
    """

    def __init__(self, folder: str | Path, resume_step: int = 0, kept_rows: tuple[int, int] | None = None) -> None:
        self.folder = Path(folder)
        self.failed = False
        """True once an OS error turned the files off."""
        self.closed = False
        self.elapsed_before = 0.0
        """Training seconds recorded before `resume_step` (a resumed run's clock goes on from there)."""
        self.rows_written = [0, 0]
        """Rows in the events and metrics files so far, saved with each checkpoint."""
        self._events: Any = None
        self._metrics: Any = None
        self._last_flush = time.monotonic()
        self._open(resume_step, kept_rows)

    @_off_on_os_error
    def _open(self, resume_step: int, kept_rows: tuple[int, int] | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if resume_step == 0:
            self._keep_previous_run()
        for index, name in enumerate((EVENTS_FILE, METRICS_FILE)):
            kept = []
            if resume_step > 0:
                rows = read_jsonl(self.folder / name)
                kept = rows[:kept_rows[index]] if kept_rows is not None else \
                    [row for row in rows if row.get("step", 0) <= resume_step]
            (self.folder / name).write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
            self.rows_written[index] = len(kept)
            times = [row["elapsed_s"] for row in kept if isinstance(row.get("elapsed_s"), (int, float))]
            self.elapsed_before = max([self.elapsed_before, *times])
        self._events = (self.folder / EVENTS_FILE).open("a", encoding="utf-8")
        self._metrics = (self.folder / METRICS_FILE).open("a", encoding="utf-8")

    def _keep_previous_run(self) -> None:
        """Move the files a previous run left here into `previous/run-N/`, the first N not taken."""
        names = [name for name in (EVENTS_FILE, METRICS_FILE, RANGE_TEST_FILE) if (self.folder / name).is_file()]
        if not names:
            return
        number = 1
        while (self.folder / PREVIOUS_DIR / f"run-{number}").exists():
            number += 1
        kept = self.folder / PREVIOUS_DIR / f"run-{number}"
        kept.mkdir(parents=True)
        for name in names:
            (self.folder / name).rename(kept / name)

    @_off_on_os_error
    def event(self, record: dict[str, Any]) -> None:
        self._events.write(json.dumps(_strict(record)) + "\n")
        self._events.flush()
        self.rows_written[0] += 1

    @_off_on_os_error
    def metrics(self, row: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(_strict(row)) + "\n")
        self.rows_written[1] += 1
        if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    @_off_on_os_error
    def range_test(self, record: dict[str, Any]) -> None:
        (self.folder / RANGE_TEST_FILE).write_text(json.dumps(_strict(record)), encoding="utf-8")

    @_off_on_os_error
    def flush(self) -> None:
        self._metrics.flush()
        self._last_flush = time.monotonic()

    @_off_on_os_error
    def close(self) -> None:
        self.closed = True
        self._events.close()
        self._metrics.close()


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_jsonl(path: str | Path, merge_by_step: bool = False,
               required: Mapping[str, type] | None = None) -> list[dict[str, Any]]:
    """The rows of a JSONL run file (none if it is missing); with `merge_by_step`, one per step, in step order
    (later rows update earlier ones: a log step's quartile losses, a resumed run's repeat of a step).

    A row must be a JSON object with an integer `step` and the `required` fields of their types; anything else
    (a line cut short by a crash, bytes that are not UTF-8, `[1, 2]`, `"step": "7"`) is skipped, with one
    warning that counts them, so a damaged line costs a point of a plot, not the report.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows, malformed = [], 0
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError:  # not UTF-8, not JSON, or cut short
            row = None
        if isinstance(row, dict) and _is_step(row.get("step")) and all(
                isinstance(row.get(key), kind) for key, kind in (required or {}).items()):
            rows.append(row)
        else:
            malformed += 1
    if malformed:
        logger.warning("skipped %d malformed row%s in %s", malformed, "" if malformed == 1 else "s", path)
    if not merge_by_step:
        return rows
    merged: dict[int, dict[str, Any]] = {}
    for row in rows:
        merged.setdefault(row["step"], {}).update(row)
    return [merged[step] for step in sorted(merged)]
