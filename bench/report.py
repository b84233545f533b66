"""Tables and plots of an LR sweep: robust fraction, median loss per LR, steps to target, divergences, and
"first, do no harm": each hf_r8 method against the stock Trainer on the same schedule, at the LR where that
schedule is best and at AdamW's usual 1e-3, and against itself with the LR range test off."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROBUST_TOLERANCE = 0.02
LOOSE_TOLERANCE = 0.10  # a second lens on the same numbers: the 2% criterion is all-or-nothing on tiny tasks
FROM_BELOW_TOLERANCE = 0.05
TUNED_BASELINES = ("constant", "cosine", "schedulefree")
USUAL_LR = 1e-3


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    # a diverged seed counts as +inf: the median is inf once half the seeds diverged
    return statistics.median(finite + [math.inf] * (len(values) - len(finite))) if values else math.inf


def _versus(by_key: dict[tuple[str, str, float], list[Any]], task: str, method: str, other: str,
            lr: float) -> tuple[float, float, float] | None:
    """`method` against `other` at `lr`: the ratio of their median final losses over seeds, and the lowest and
    highest ratio of one seed's runs (the seed's spread); None when either was not run there."""
    mine = {run.seed: run.final_eval_loss for run in by_key.get((task, method, lr), [])}
    theirs = {run.seed: run.final_eval_loss for run in by_key.get((task, other, lr), [])}
    if not mine or not theirs:
        return None
    per_seed = [mine[seed] / theirs[seed] for seed in sorted(mine.keys() & theirs.keys())]
    finite = [ratio for ratio in per_seed if math.isfinite(ratio)] or [math.inf]
    median_ratio = _median(list(mine.values())) / _median(list(theirs.values()))
    return median_ratio, min(finite), max(finite)


def do_no_harm(by_key: dict[tuple[str, str, float], list[Any]], task: str, medians: dict[str, dict[float, float]],
               stock: str, test_off: str | None, method: str) -> dict[str, Any]:
    """`method` against `stock` (the same schedule without hf_r8) at the LR where the stock schedule is best and
    at `USUAL_LR`, and against `test_off` (itself with the LR range test off) at both."""
    stock_best_lr = min(medians[stock], key=medians[stock].get)
    row = {"stock": stock, "stock_best_lr": stock_best_lr,
           "at_stock_best": _versus(by_key, task, method, stock, stock_best_lr),
           "at_usual_lr": _versus(by_key, task, method, stock, USUAL_LR)}
    if test_off is not None and test_off in medians:
        row["test_off"] = test_off
        row["test_off_at_stock_best"] = _versus(by_key, task, method, test_off, stock_best_lr)
        row["test_off_at_usual_lr"] = _versus(by_key, task, method, test_off, USUAL_LR)
    return row


def summarize(runs: list[Any], counterparts: dict[str, tuple[str, str | None]] | None = None
              ) -> dict[str, dict[str, Any]]:
    """Per task, per method: median final loss per LR, robust fraction, best LR, steps to target; and, for the
    methods in `counterparts` (method: (stock, test_off)), `do_no_harm`."""
    by_key: dict[tuple[str, str, float], list[Any]] = defaultdict(list)
    for run in runs:
        by_key[(run.task, run.method, run.lr)].append(run)
    summary: dict[str, dict[str, Any]] = {}
    for task in sorted({run.task for run in runs}):
        methods = sorted({run.method for run in runs if run.task == task}, key=_method_order)
        lrs = sorted({run.lr for run in runs if run.task == task})
        medians = {m: {lr: _median([r.final_eval_loss for r in by_key[(task, m, lr)]]) for lr in lrs} for m in methods}
        best = min(value for per_lr in medians.values() for value in per_lr.values())
        cosine_best_lr = min(lrs, key=lambda lr: medians.get("cosine", {}).get(lr, math.inf))
        target = medians.get("cosine", {}).get(cosine_best_lr, math.inf)
        rows = {}
        for method in methods:
            best_lr = min(lrs, key=lambda lr, m=method: medians[m][lr])
            rows[method] = {
                "medians": medians[method],
                "robust_fraction": sum(v <= best * (1 + ROBUST_TOLERANCE) for v in medians[method].values()) / len(lrs),
                "loose_fraction": sum(v <= best * (1 + LOOSE_TOLERANCE) for v in medians[method].values()) / len(lrs),
                "worst_loss": max(medians[method].values()),
                "best_lr": best_lr,
                "best_loss": medians[method][best_lr],
                "steps_to_target": _steps_to_target(by_key[(task, method, best_lr)], target),
                "divergences": sum(r.diverged for lr in lrs for r in by_key[(task, method, lr)]),
                "runs": sum(len(by_key[(task, method, lr)]) for lr in lrs),
                "extra_forward_passes": sum(r.extra_forward_passes for lr in lrs for r in by_key[(task, method, lr)]),
                "curve": _median_curve(by_key[(task, method, best_lr)]),
                "from_100x_below": _steps_from_below(by_key, task, method, best_lr, medians[method][best_lr]),
                "forgetting": {lr: _median([r.forgetting_loss for r in by_key[(task, method, lr)]
                                            if getattr(r, "forgetting_loss", None) is not None]) for lr in lrs},
                "rollbacks": sum(getattr(r, "rollbacks", 0) for lr in lrs for r in by_key[(task, method, lr)]),
                "skipped_steps": sum(getattr(r, "skipped_steps", 0) for lr in lrs for r in by_key[(task, method, lr)]),
            }
        counterparts = counterparts or {}
        harm = {method: do_no_harm(by_key, task, medians, *counterparts[method], method)
                for method in methods if method in counterparts and counterparts[method][0] in medians}
        summary[task] = {"best": best, "target": target, "cosine_best_lr": cosine_best_lr, "lrs": lrs, "rows": rows,
                         "do_no_harm": harm}
    return summary


def _median_curve(runs: list[Any]) -> tuple[list[int], list[float]]:
    steps = runs[0].eval_steps
    return steps, [_median([run.eval_losses[i] for run in runs if i < len(run.eval_losses)]) for i in range(len(steps))]


def _steps_from_below(by_key: dict[tuple[str, str, float], list[Any]], task: str, method: str, best_lr: float,
                      best_loss: float) -> int | str:
    """Steps the median run started 100x below the method's best LR needs to come within 5% of the best LR's
    final loss: "never", or "n/a" when that LR is not on the grid."""
    runs = next((runs for (t, m, lr), runs in by_key.items()
                 if t == task and m == method and math.isclose(lr, best_lr / 100, rel_tol=1e-6)), None)
    if not runs:
        return "n/a"
    reached = _steps_to_target(runs, best_loss * (1 + FROM_BELOW_TOLERANCE))
    return "never" if reached is None else reached


def _steps_to_target(runs: list[Any], target: float) -> int | None:
    steps, losses = _median_curve(runs)
    return next((step for step, loss in zip(steps, losses, strict=True) if loss <= target), None)


def _method_order(name: str) -> tuple[int, str]:
    order = ["constant", "linear", "cosine", "plateau", "greedy", "schedulefree", "prodigy", "r8_cosine",
             "r8_constant", "r8_gentle", "r8_find_lr"]
    return (order.index(name) if name in order else len(order), name)


def _ratio(versus: tuple[float, float, float] | None) -> str:
    return "n/a" if versus is None else f"{versus[0]:.3f}x ({versus[1]:.3f}-{versus[2]:.3f})"


def _do_no_harm_table(harm: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["First, do no harm: each hf_r8 method's median final loss over the stock Trainer's on the same "
             "schedule (the seeds' spread of paired runs in brackets), at the LR where that schedule is best and at "
             f"lr={USUAL_LR:g}; and over the same run with the LR range test off.", "",
             "| method | stock | vs stock at stock's best LR | at lr=0.001 vs stock | vs test off at stock's best LR "
             "| vs test off at lr=0.001 |", "|---|---|---|---|---|---|"]
    for method, row in harm.items():
        lines.append(f"| {method} | {row['stock']} (best lr={row['stock_best_lr']:g}) | {_ratio(row['at_stock_best'])} "
                     f"| {_ratio(row['at_usual_lr'])} | {_ratio(row.get('test_off_at_stock_best'))} "
                     f"| {_ratio(row.get('test_off_at_usual_lr'))} |")
    return lines


def write_report(name: str, meta: dict[str, Any], runs: list[Any], results_dir: Path,
                 counterparts: dict[str, tuple[str, str | None]] | None = None) -> str:
    summary = summarize(runs, counterparts)
    lines = [f"# LR sweep: {name}", "",
             f"Machine: {meta['machine']}. Wall time: {meta['elapsed_s'] / 60:.1f} min for {len(runs)} runs. "
             f"LR grid {meta['lr_grid']}, seeds {meta['seeds']}; each grid point is the median over seeds of the "
             f"final held-out loss. Robust fraction: share of grid points within {ROBUST_TOLERANCE:.0%} of the best "
             "median any method reached on the task. Steps to target: first evaluation at which the method's median "
             "curve, at its own best LR, reaches the final loss of cosine at cosine's best LR.", ""]
    if meta.get("reused"):
        lines += [f"Reused (not run again: they do not depend on hf_r8's code): {meta['reused']}. The wall time "
                  "counts the runs made now.", ""]
    lines += [f"- `{method}`: {description}" for method, description in meta["methods"].items()]
    lines.append("")
    for task, data in summary.items():
        tuned = [data["rows"][m]["best_loss"] for m in TUNED_BASELINES if m in data["rows"]]
        tuned_best = min(tuned) if tuned else math.inf
        lines += [f"## {task}", "", meta["tasks"][task], "",
                  f"Best median final loss (any method): {data['best']:.4f}; best tuned baseline (constant, cosine, "
                  f"schedule-free at their best LR): {tuned_best:.4f}. Target (cosine at lr="
                  f"{data['cosine_best_lr']:g}): {data['target']:.4f}.", "",
                  "| method | robust fraction (2%) | within 10% | worst loss (x task best) | best lr "
                  "| best loss (vs tuned) | steps to target | from 100x below: steps to 5% | divergences "
                  "| rollbacks / skipped steps | "
                  + " | ".join(f"lr={lr:g}" for lr in data["lrs"]) + " |",
                  "|---" * (10 + len(data["lrs"])) + "|"]
        for method, row in data["rows"].items():
            steps = "never" if row["steps_to_target"] is None else str(row["steps_to_target"])
            cells = " | ".join(f"{row['medians'][lr]:.4f}" for lr in data["lrs"])
            lines.append(f"| {method} | {row['robust_fraction']:.2f} | {row['loose_fraction']:.2f} | "
                         f"{row['worst_loss']:.4f} ({row['worst_loss'] / data['best']:.2f}x) | {row['best_lr']:g} | "
                         f"{row['best_loss']:.4f} ({row['best_loss'] / tuned_best - 1:+.1%}) | {steps} | "
                         f"{row['from_100x_below']} | {row['divergences']}/{row['runs']} | "
                         f"{row['rollbacks']} / {row['skipped_steps']} | {cells} |")
        if any(math.isfinite(value) for row in data["rows"].values() for value in row["forgetting"].values()):
            cosine_lr = data["cosine_best_lr"]
            lines += ["", f"Forgetting (median final loss on the pre-training corpus' held-out blocks; lower is less "
                          f"forgetting) at cosine's best LR ({cosine_lr:g}) and at each method's own best LR:", "",
                      "| method | at cosine's best LR | at its own best LR |", "|---|---|---|"]
            lines += [f"| {method} | {row['forgetting'][cosine_lr]:.4f} | {row['forgetting'][row['best_lr']]:.4f} |"
                      for method, row in data["rows"].items()]
        if data["do_no_harm"]:
            lines += ["", *_do_no_harm_table(data["do_no_harm"])]
        extra = {m: r["extra_forward_passes"] for m, r in data["rows"].items() if r["extra_forward_passes"]}
        if extra:
            lines += ["", "Extra forward passes (held-out evaluation batches the method itself reads): "
                      + ", ".join(f"{m} {n}" for m, n in extra.items()) + "."]
        lines.append("")
        _plot(task, data, results_dir / f"{name}_{task}.png")
        lines += [f"![{task}]({name}_{task}.png)", ""]
    text = "\n".join(lines)
    (results_dir / f"{name}.md").write_text(text)
    return text


def _plot(task: str, data: dict[str, Any], path: Path) -> None:
    figure, (curves, sweep) = plt.subplots(1, 2, figsize=(13, 4.8))
    for method, row in data["rows"].items():
        style = "-" if method.startswith("r8") else "--"
        steps, losses = row["curve"]
        curves.plot(steps, losses, style, label=f"{method} (lr={row['best_lr']:g})")
        lrs = data["lrs"]
        sweep.plot(lrs, [min(row["medians"][lr], 50.0) for lr in lrs], style + "o", label=method, markersize=3)
    if math.isfinite(data["target"]):
        curves.axhline(data["target"], color="gray", linewidth=0.8)
    curves.set(title=f"{task}: held-out loss at each method's best LR (median)", xlabel="step", ylabel="eval loss")
    sweep.axhline(data["best"] * (1 + ROBUST_TOLERANCE), color="gray", linewidth=0.8)
    sweep.set(title=f"{task}: final held-out loss vs initial LR", xlabel="initial LR", ylabel="eval loss",
              xscale="log")
    finite = [v for row in data["rows"].values() for v in row["medians"].values() if math.isfinite(v)]
    top = min(max(finite), 50.0) * 1.1
    for axis in (curves, sweep):
        axis.set_yscale("log")
        axis.set_ylim(data["best"] * 0.9, top)
    curves.legend(fontsize=7)
    sweep.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
