"""Catalog and sampler at scale: bytes per example, update time, epoch-plan time at 1M and 10M examples.

    python bench/catalog_scale.py          # writes bench/results/catalog_scale.md
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from hf_r8.data.catalog import LossCatalog
from hf_r8.data.sampler import BalancedQuartileSampler

RESULTS = Path(__file__).parent / "results"


def measure(size: int, batch: int = 1024) -> dict[str, float]:
    rng = np.random.default_rng(0)
    catalog = LossCatalog(size)
    catalog.update_exact(np.arange(size), rng.random(size).astype(np.float32), step=1)  # a cataloged epoch
    indices = rng.integers(0, size, batch)
    started = time.perf_counter()
    for step in range(100):
        catalog.update_exact(indices, rng.random(batch), step=step)
    update_ms = (time.perf_counter() - started) / 100 * 1e3
    sampler = BalancedQuartileSampler(catalog, batch_size=32, seed=0)
    sampler.set_epoch(1)
    started = time.perf_counter()
    plan = sampler.plan()
    plan_s = time.perf_counter() - started
    assert len(plan) == size
    return {"bytes": catalog.bytes_per_example, "update_ms": update_ms, "plan_s": plan_s}


def main() -> None:
    lines = ["# Catalog and sampler at scale", "",
             f"Machine: {platform.machine()}, numpy {np.__version__}. Update: one exact update of a batch of 1024 "
             "examples (mean of 100). Plan: one full epoch plan of the balanced sampler (quartiles, usage order, "
             "batch assembly) for batch size 32.", "",
             "| examples | bytes per example | update (ms per batch) | epoch plan (s) |", "|---|---|---|---|"]
    for size in (1_000_000, 10_000_000):
        figures = measure(size)
        lines.append(f"| {size:,} | {figures['bytes']:.0f} | {figures['update_ms']:.3f} | {figures['plan_s']:.2f} |")
        print(lines[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "catalog_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
