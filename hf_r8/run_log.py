"""The run's record on disk, next to the Trainer's checkpoints (main process only).

* `r8_events.jsonl`: one JSON object per decision, skip, rollback or sampler plan —
  `{"step", "kind", "group", "old", "new", "reason", "signals"}` — flushed line by line, so a
  crash loses nothing written before it.
* `r8_metrics.jsonl`: per-step series `{"step", "loss", "grad_norm", "lr", "base_lr", "gain", ...}`,
  buffered and flushed at each Trainer log, save and at the end (cheap: one line per step). Rows
  for the same step (a log step adds the catalog's quartile losses) are merged by the reader.

A resumed run appends to the same files; `read_jsonl` keeps the last row written for each step.
Non-finite numbers are written as null (strict JSON, readable by any tool).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

EVENTS_FILE = "r8_events.jsonl"
METRICS_FILE = "r8_metrics.jsonl"


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


class RunLog:
    """Appends to `folder/r8_events.jsonl` and `folder/r8_metrics.jsonl`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._events = (self.folder / EVENTS_FILE).open("a", encoding="utf-8")
        self._metrics = (self.folder / METRICS_FILE).open("a", encoding="utf-8")

    def event(self, record: dict[str, Any]) -> None:
        self._events.write(json.dumps(_strict(record)) + "\n")
        self._events.flush()

    def metrics(self, row: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(_strict(row)) + "\n")

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
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not merge_by_step:
        return rows
    merged: dict[int, dict[str, Any]] = {}
    for row in rows:
        merged.setdefault(row["step"], {}).update(row)
    return [merged[step] for step in sorted(merged)]
