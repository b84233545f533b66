"""`hf-r8 report OUTPUT_DIR`: plots and a summary of a run from its `r8_events.jsonl` and `r8_metrics.jsonl`.

The run files are in OUTPUT_DIR/r8/, or, for a run written before that folder existed, in OUTPUT_DIR
itself; the report goes next to them, into `r8_report/`:

* `loss.png`: raw and smoothed loss, with markers for LR decisions, skipped steps and rollbacks;
* `lr.png`: the LR used against the schedule's (log scale), and the gain;
* `momentum.png`: momentum and exploration sigma (when the run had them);
* `reward.png`: reward (RL runs);
* `quartiles.png`: the catalog's mean loss per quartile over time (R8Trainer);
* `range_test.png`: the LR range test's loss against the LR swept, denoised, and the LR chosen (when the
  run had one);
* `summary.md`: decisions by kind, skipped steps, rollbacks, steps and wall time.

Rows of the wrong shape (not an object, no integer `step`, an event without a string `kind`, bytes
that are not UTF-8, a line cut short by a crash) are skipped with one warning per file (`read_jsonl`).
What cannot be reported (no run files, no metrics, a file in the way of the report folder) raises an
error that says so; nothing here catches errors, the caller decides (R8Callback warns, `hf-r8 report`
exits non-zero with the message).

Figures are drawn with `matplotlib.figure.Figure` and saved through its own Agg canvas: pyplot and the
process's matplotlib backend (a notebook's inline one, say) are never touched.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

from hf_r8.control.signals import Ema
from hf_r8.ui.run_log import EVENTS_FILE, METRICS_FILE, RANGE_TEST_FILE, RUN_DIR, read_jsonl, run_files_dir

REPORT_DIR = "r8_report"
_MARKERS = {"decision": ("^", "tab:green"), "guard": ("x", "tab:orange"), "rollback": ("v", "tab:red")}

logger = logging.getLogger(__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range_test_problem(record: Any) -> str | None:
    """What makes `record` not an LR range test record as `RunLog.range_test` writes it, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if not isinstance(record.get("step"), int) or isinstance(record.get("step"), bool):
        return "step must be an integer"
    for key in ("suggested_gain", "chosen_gain"):
        if not _is_number(record.get(key)):
            return f"{key} must be a number"
    base_lrs = record.get("base_lrs")
    if not (isinstance(base_lrs, list) and base_lrs and _is_number(base_lrs[0])):
        return "base_lrs must be a non-empty list of numbers"
    for key in ("curve", "denoised"):
        points = record.get(key)
        if not (isinstance(points, list) and all(
                isinstance(point, list) and len(point) == 2 and _is_number(point[0])
                and (point[1] is None or _is_number(point[1])) for point in points)):
            return f"{key} must be a list of [gain, loss] pairs"
    return None


def _read_range_test(path: Path) -> dict[str, Any] | None:
    """The LR range test's record; None when the run had none, or (with a warning) when the file is not one."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as error:
        problem = f"not UTF-8 JSON ({error})"
    else:
        problem = _range_test_problem(record)
    if problem is None:
        return record
    logger.warning("left the LR range test out of the report: %s: %s", path, problem)
    return None


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if _is_number(row.get(key))]
    return [step for step, _ in points], [value for _, value in points]


def _smoothed(values: list[float], beta: float = 0.9) -> list[float]:
    ema = Ema(beta)
    return [ema.update(value) for value in values]


def write_report(output_dir: str | Path) -> list[Path]:
    """Write the plots and summary for the run in `output_dir` next to its run files; returns the files written.

    Raises:
        FileNotFoundError: `output_dir` does not exist, or holds no run files (neither in `r8/` nor itself).
        NotADirectoryError: `output_dir` is a file.
        ValueError: the metrics file has no well-formed row.
        FileExistsError: a file named `r8_report` is where the report's folder goes.
    """
    from matplotlib.figure import Figure

    output_dir = Path(output_dir)
    if not output_dir.exists():
        raise FileNotFoundError(f"{output_dir}: no such folder (pass the output_dir of the run)")
    if not output_dir.is_dir():
        raise NotADirectoryError(f"{output_dir}: a file, not a folder (pass the output_dir of the run)")
    files_dir = run_files_dir(output_dir)
    if not (files_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"{output_dir}: no {METRICS_FILE} in it or in {output_dir / RUN_DIR}; was the "
                                "run made with R8Callback and R8Config(run_files=True)?")
    folder = files_dir / REPORT_DIR
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder; the report is written into a folder of that "
                              "name (move or remove the file)")
    rows = read_jsonl(files_dir / METRICS_FILE, merge_by_step=True)
    if not rows:
        raise ValueError(f"{files_dir / METRICS_FILE}: no well-formed rows, nothing to report")
    events = read_jsonl(files_dir / EVENTS_FILE, required={"kind": str})
    range_test = _read_range_test(files_dir / RANGE_TEST_FILE)
    folder.mkdir(exist_ok=True)
    written: list[Path] = []

    def new_axis() -> tuple[Figure, Any]:
        figure = Figure(figsize=(9, 4))
        return figure, figure.subplots()

    def save(figure: Figure, name: str) -> None:
        figure.tight_layout()
        figure.savefig(folder / name, dpi=110)
        written.append(folder / name)

    steps, losses = _series(rows, "loss")
    figure, axis = new_axis()
    axis.plot(steps, losses, linewidth=0.7, alpha=0.5, label="loss")
    axis.plot(steps, _smoothed(losses), linewidth=1.5, label="smoothed (EMA 0.9)")
    loss_at = dict(zip(steps, losses, strict=True))
    for rule, (marker, color) in _MARKERS.items():
        marked = sorted({event["step"] for event in events if event["kind"].startswith(f"{rule}/")})
        if marked:
            axis.scatter(marked, [loss_at.get(step, math.nan) for step in marked], marker=marker, color=color,
                         zorder=3, label=f"{rule} ({len(marked)})")
    axis.set(xlabel="optimizer step", ylabel="training loss", title="loss")
    axis.legend(fontsize=8)
    save(figure, "loss.png")

    figure, axis = new_axis()
    axis.plot(*_series(rows, "lr"), label="LR used")
    axis.plot(*_series(rows, "base_lr"), linestyle="--", label="schedule")
    axis.set(xlabel="optimizer step", ylabel="learning rate", yscale="log", title="learning rate")
    gain_axis = axis.twinx()
    # The range test's sweep (gains up to its top, 10,000 by default) would squeeze the gain the run trains at
    # to a flat line: it is shaded, and the gain is drawn from the step the test ended at.
    swept = range_test["step"] if range_test is not None else 0
    if swept:
        axis.axvspan(0, swept, color="tab:orange", alpha=0.12, label="LR range test")
    gain_steps, gains = _series(rows, "gain")
    after = [index for index, step in enumerate(gain_steps) if step > swept]
    gain_axis.plot([gain_steps[i] for i in after], [gains[i] for i in after], color="tab:gray", linewidth=0.8,
                   label="gain")
    gain_axis.set_ylabel("gain")
    axis.legend(loc="upper left", fontsize=8)
    gain_axis.legend(loc="upper right", fontsize=8)
    save(figure, "lr.png")

    for name, keys in (("momentum.png", ("momentum", "sigma")), ("reward.png", ("reward",)),
                       ("quartiles.png", ("q1_loss", "q2_loss", "q3_loss", "q4_loss"))):
        present = [key for key in keys if _series(rows, key)[0]]
        if not present:
            continue
        figure, axis = new_axis()
        for key in present:
            axis.plot(*_series(rows, key), label=key)
        axis.set(xlabel="optimizer step", title=name.removesuffix(".png"))
        axis.legend(fontsize=8)
        save(figure, name)

    if range_test is not None and range_test["curve"]:
        base_lr = range_test["base_lrs"][0]
        figure, axis = new_axis()
        axis.plot([gain * base_lr for gain, _ in range_test["curve"]], [loss for _, loss in range_test["curve"]],
                  "o", markersize=3, alpha=0.6, label="loss at each step of the sweep")
        axis.plot([gain * base_lr for gain, _ in range_test["denoised"]],
                  [loss for _, loss in range_test["denoised"]], label="denoised (mean of 3)")
        axis.axvline(base_lr, color="tab:gray", linestyle="--", linewidth=0.8, label=f"LR set ({base_lr:.3g})")
        chosen = range_test["chosen_gain"] * base_lr
        axis.axvline(chosen, color="tab:green", linewidth=1.2, label=f"LR chosen ({chosen:.3g})")
        finite = [loss for _, loss in range_test["curve"] if _is_number(loss)]
        axis.set(xlabel="learning rate", ylabel="training loss", xscale="log", title="LR range test",
                 ylim=(min(finite) * 0.95, min(max(finite), 3 * finite[0]) * 1.05) if finite else None)
        axis.legend(fontsize=8)
        save(figure, "range_test.png")

    # A decision that changed several parameter groups (decay / no decay) at one step is one decision.
    kinds = Counter(kind for _, kind in {(event["step"], event["kind"]) for event in events})
    last = rows[-1]
    lines = ["# hf_r8 run report", "", f"Run: `{files_dir}`; {len(rows)} steps recorded (last step {last['step']}).",
             "", "| event | count |", "|---|---|"]
    lines += [f"| {kind} | {count} |" for kind, count in sorted(kinds.items())] or ["| (none) | 0 |"]
    if range_test is not None:
        base_lr = range_test["base_lrs"][0]
        suggested, chosen = range_test["suggested_gain"] * base_lr, range_test["chosen_gain"] * base_lr
        # Since 0.2 the sweep runs before the first counted step ("sweep_steps"); before, on the first steps.
        steps = range_test.get("sweep_steps", range_test["step"])
        lines += ["", f"LR range test: {steps} steps, LR set {base_lr:.3g}, suggested {suggested:.3g}, "
                      f"chosen {chosen:.3g}."]
    timed = [row for row in rows if _is_number(row.get("elapsed_s"))]
    if timed:
        first, final = timed[0], timed[-1]
        per_step = (final["elapsed_s"] - first["elapsed_s"]) / max(1, final["step"] - first["step"])
        lines += ["", f"Wall time in training: {final['elapsed_s']:.1f} s to step {final['step']} "
                      f"({per_step:.3f} s per step)."]
    lines += ["", *[f"![{path.stem}]({path.name})" for path in written], ""]
    (folder / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    written.append(folder / "summary.md")
    return written
