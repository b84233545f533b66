"""The run's record on disk, next to the Trainer's checkpoints (main process only).

* `r8_events.jsonl`: one JSON object per decision, skip, rollback or sampler plan —
  `{"step", "kind", "group", "old", "new", "reason", "signals"}` — flushed line by line, so a
  crash loses nothing written before it.
* `r8_metrics.jsonl`: per-step series `{"step", "loss", "grad_norm", "lr", "base_lr", "gain", ...}`,
  buffered and flushed at each Trainer log, save and at the end (cheap: one line per step). Rows
  for the same step (a log step adds the catalog's quartile losses) are merged by the reader.

* `r8_range_test.json`: the LR range test's curve (gain, loss), its denoised form and the gain chosen,
  written when the test ends.

A fresh run (step 0) starts both files anew; a resumed run keeps what was written up to its
checkpoint's step, drops what came after (a crashed run's last steps, about to be redone) and
appends. A line cut short by a crash is skipped by `read_jsonl`. Non-finite numbers are written as
null (strict JSON, readable by any tool).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

EVENTS_FILE = "r8_events.jsonl"
METRICS_FILE = "r8_metrics.jsonl"
RANGE_TEST_FILE = "r8_range_test.json"


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


class RunLog:
    """Writes `folder/r8_events.jsonl` and `folder/r8_metrics.jsonl` for a run starting at `resume_step`."""

    def __init__(self, folder: str | Path, resume_step: int = 0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.elapsed_before = 0.0
        """Training seconds recorded before `resume_step` (a resumed run's clock goes on from there)."""
        for name in (EVENTS_FILE, METRICS_FILE):
            kept = [row for row in read_jsonl(self.folder / name) if row.get("step", 0) <= resume_step] \
                if resume_step > 0 else []
            (self.folder / name).write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
            times = [row["elapsed_s"] for row in kept if isinstance(row.get("elapsed_s"), (int, float))]
            self.elapsed_before = max([self.elapsed_before, *times])
        if resume_step == 0:
            (self.folder / RANGE_TEST_FILE).unlink(missing_ok=True)  # a previous run's test
        self._events = (self.folder / EVENTS_FILE).open("a", encoding="utf-8")
        self._metrics = (self.folder / METRICS_FILE).open("a", encoding="utf-8")

    def event(self, record: dict[str, Any]) -> None:
        self._events.write(json.dumps(_strict(record)) + "\n")
        self._events.flush()

    def metrics(self, row: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(_strict(row)) + "\n")

    def range_test(self, record: dict[str, Any]) -> None:
        (self.folder / RANGE_TEST_FILE).write_text(json.dumps(_strict(record)), encoding="utf-8")

    def flush(self) -> None:
        self._metrics.flush()

    def close(self) -> None:
        self._events.close()
        self._metrics.close()


def read_jsonl(path: str | Path, merge_by_step: bool = False) -> list[dict[str, Any]]:
    """The objects of a JSONL file; with `merge_by_step`, one per step (later rows override earlier ones,
    and a resumed run's rows override those of the steps it repeats)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    if not merge_by_step:
        return rows
    merged: dict[int, dict[str, Any]] = {}
    for row in rows:
        merged.setdefault(row["step"], {}).update(row)
    return [merged[step] for step in sorted(merged)]
