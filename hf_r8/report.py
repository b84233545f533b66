"""`hf-r8 report OUTPUT_DIR`: plots and a summary of a run from its `r8_events.jsonl` and `r8_metrics.jsonl`.

Writes into OUTPUT_DIR/r8_report/:

* `loss.png`: raw and smoothed loss, with markers for LR decisions, skipped steps and rollbacks;
* `lr.png`: the LR used against the schedule's (log scale), and the gain;
* `momentum.png`: momentum and exploration sigma (when the run had them);
* `reward.png`: reward (RL runs);
* `quartiles.png`: the catalog's mean loss per quartile over time (R8Trainer);
* `range_test.png`: the LR range test's loss against the LR swept, denoised, and the LR chosen (when the
  run had one);
* `summary.md`: decisions by kind, skipped steps, rollbacks, steps and wall time.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from hf_r8.run_log import EVENTS_FILE, METRICS_FILE, RANGE_TEST_FILE, read_jsonl

REPORT_DIR = "r8_report"
_MARKERS = {"decision": ("^", "tab:green"), "guard": ("x", "tab:orange"), "rollback": ("v", "tab:red")}


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    return [step for step, _ in points], [value for _, value in points]


def _smoothed(values: list[float], beta: float = 0.9) -> list[float]:
    smoothed, ema = [], None
    for value in values:
        ema = value if ema is None else beta * ema + (1 - beta) * value
        smoothed.append(ema)
    return smoothed


def write_report(output_dir: str | Path) -> list[Path]:
    """Write the plots and summary for the run in `output_dir`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    rows = read_jsonl(output_dir / METRICS_FILE, merge_by_step=True)
    events = read_jsonl(output_dir / EVENTS_FILE)
    if not rows:
        raise FileNotFoundError(f"{output_dir / METRICS_FILE}: no metrics to report (was the run made with R8Callback "
                                "and R8Config(run_files=True)?)")
    folder = output_dir / REPORT_DIR
    folder.mkdir(exist_ok=True)
    written: list[Path] = []

    def save(figure: Any, name: str) -> None:
        figure.tight_layout()
        figure.savefig(folder / name, dpi=110)
        plt.close(figure)
        written.append(folder / name)

    steps, losses = _series(rows, "loss")
    figure, axis = plt.subplots(figsize=(9, 4))
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

    figure, axis = plt.subplots(figsize=(9, 4))
    axis.plot(*_series(rows, "lr"), label="LR used")
    axis.plot(*_series(rows, "base_lr"), linestyle="--", label="schedule")
    axis.set(xlabel="optimizer step", ylabel="learning rate", yscale="log", title="learning rate")
    gain_axis = axis.twinx()
    gain_axis.plot(*_series(rows, "gain"), color="tab:gray", linewidth=0.8, label="gain")
    gain_axis.set_ylabel("gain")
    axis.legend(loc="upper left", fontsize=8)
    gain_axis.legend(loc="upper right", fontsize=8)
    save(figure, "lr.png")

    for name, keys in (("momentum.png", ("momentum", "sigma")), ("reward.png", ("reward",)),
                       ("quartiles.png", ("q1_loss", "q2_loss", "q3_loss", "q4_loss"))):
        present = [key for key in keys if _series(rows, key)[0]]
        if not present:
            continue
        figure, axis = plt.subplots(figsize=(9, 4))
        for key in present:
            axis.plot(*_series(rows, key), label=key)
        axis.set(xlabel="optimizer step", title=name.removesuffix(".png"))
        axis.legend(fontsize=8)
        save(figure, name)

    range_test_path = output_dir / RANGE_TEST_FILE
    range_test = json.loads(range_test_path.read_text(encoding="utf-8")) if range_test_path.is_file() else None
    if range_test is not None and range_test.get("curve"):
        base_lr = range_test["base_lrs"][0]
        figure, axis = plt.subplots(figsize=(9, 4))
        axis.plot([gain * base_lr for gain, _ in range_test["curve"]], [loss for _, loss in range_test["curve"]],
                  "o", markersize=3, alpha=0.6, label="loss at each step of the sweep")
        axis.plot([gain * base_lr for gain, _ in range_test["denoised"]],
                  [loss for _, loss in range_test["denoised"]], label="denoised (mean of 3)")
        axis.axvline(base_lr, color="tab:gray", linestyle="--", linewidth=0.8, label=f"LR set ({base_lr:.3g})")
        chosen = range_test["chosen_gain"] * base_lr
        axis.axvline(chosen, color="tab:green", linewidth=1.2, label=f"LR chosen ({chosen:.3g})")
        finite = [loss for _, loss in range_test["curve"] if isinstance(loss, (int, float))]
        axis.set(xlabel="learning rate", ylabel="training loss", xscale="log", title="LR range test",
                 ylim=(min(finite) * 0.95, min(max(finite), 3 * finite[0]) * 1.05) if finite else None)
        axis.legend(fontsize=8)
        save(figure, "range_test.png")

    kinds = Counter(event["kind"] for event in events)
    last = rows[-1]
    lines = ["# hf_r8 run report", "", f"Run: `{output_dir}`; {len(rows)} steps recorded (last step {last['step']}).",
             "", "| event | count |", "|---|---|"]
    lines += [f"| {kind} | {count} |" for kind, count in sorted(kinds.items())] or ["| (none) | 0 |"]
    if range_test is not None:
        base_lr = range_test["base_lrs"][0]
        suggested, chosen = range_test["suggested_gain"] * base_lr, range_test["chosen_gain"] * base_lr
        lines += ["", f"LR range test: {range_test['step']} steps, LR set {base_lr:.3g}, suggested {suggested:.3g}, "
                      f"chosen {chosen:.3g}."]
    timed = [row for row in rows if isinstance(row.get("elapsed_s"), (int, float))]
    if timed:
        first, final = timed[0], timed[-1]
        per_step = (final["elapsed_s"] - first["elapsed_s"]) / max(1, final["step"] - first["step"])
        lines += ["", f"Wall time in training: {final['elapsed_s']:.1f} s to step {final['step']} "
                      f"({per_step:.3f} s per step)."]
    lines += ["", *[f"![{path.stem}]({path.name})" for path in written], ""]
    (folder / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    written.append(folder / "summary.md")
    return written
