"""LossCatalog: exact and surprise updates, quartiles, persistence, bad input; the update queue."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_r8.data.catalog import UNSEEN, LossCatalog
from hf_r8.data.catalog_updates import CatalogUpdateQueue


def test_row_costs_at_most_24_bytes():
    assert LossCatalog(1000).bytes_per_example == 21


def test_exact_updates_start_at_the_loss_then_follow_an_ema():
    catalog = LossCatalog(4, alpha=0.5)
    catalog.update_exact([0, 1], [2.0, 4.0], step=1)
    assert catalog.ema_loss[:2].tolist() == [2.0, 4.0]
    catalog.update_exact([0], [4.0], step=2)
    assert catalog.ema_loss[0] == pytest.approx(3.0)
    assert catalog.usage.tolist() == [2, 1, 0, 0]
    assert catalog.last_step.tolist() == [2, 1, -1, -1]
    assert catalog.last_loss[0] == 4.0 and np.isnan(catalog.last_loss[2])
    assert catalog.seen.tolist() == [True, True, False, False]


def test_repeated_indices_in_one_update_apply_in_order():
    catalog = LossCatalog(2, alpha=0.5)
    catalog.update_exact([0, 0], [2.0, 4.0], step=1)
    assert catalog.ema_loss[0] == pytest.approx(3.0) and catalog.usage[0] == 2


def test_surprise_moves_every_example_by_alpha_times_the_surprise():
    catalog = LossCatalog(4, alpha=0.5)
    catalog.update_exact([0, 1], [1.0, 3.0], step=1)
    catalog.update_surprise([0, 1, 2], batch_loss=4.0, step=2)  # expected = mean(1, 3) = 2, surprise 2
    assert catalog.ema_loss[:3].tolist() == pytest.approx([2.0, 4.0, 4.0])  # the unseen one starts at 4
    assert catalog.usage.tolist() == [2, 2, 1, 0]


def test_non_finite_losses_are_ignored_and_counted():
    catalog = LossCatalog(3)
    catalog.update_exact([0, 1], [float("nan"), 2.0], step=1)
    catalog.update_surprise([2], float("inf"), step=1)
    assert catalog.seen.tolist() == [False, True, False]
    assert catalog.nonfinite_updates == 2


def test_quartiles_by_ema_with_unseen_marked():
    catalog = LossCatalog(9)
    catalog.update_exact(np.arange(8), np.arange(8, dtype=float), step=1)
    quartiles = catalog.quartiles()
    assert quartiles.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, UNSEEN]
    stats = catalog.statistics()
    assert stats["q1_loss"] == pytest.approx(0.5) and stats["q4_loss"] == pytest.approx(6.5)
    assert stats["seen_fraction"] == pytest.approx(8 / 9)


def test_save_and_load_round_trip_without_pickle(tmp_path):
    catalog = LossCatalog(5, alpha=0.2)
    catalog.update_exact([1, 3], [0.5, 2.5], step=7)
    catalog.update_surprise([4], 1.0, step=8)
    path = catalog.save(tmp_path)
    assert path.name == "r8_catalog.npz"
    restored = LossCatalog.load(tmp_path)
    assert restored.equals(catalog) and restored.alpha == 0.2


def test_an_unversioned_catalog_file_loads_and_a_newer_one_is_refused(tmp_path):
    catalog = LossCatalog(5, alpha=0.2)
    catalog.update_exact([1, 3], [0.5, math.nan], step=7)
    state = catalog.state_dict()
    old = {key: state[key] for key in ("ema_loss", "last_loss", "usage", "last_step", "seen")}
    np.savez(tmp_path / "r8_catalog.npz", **old, meta=np.array([0.2, 1.0]))  # hf_r8 <= 0.3: positional meta
    restored = LossCatalog.load(tmp_path)
    assert restored.equals(catalog) and restored.alpha == 0.2 and restored.nonfinite_updates == 1
    np.savez(tmp_path / "r8_catalog.npz", **{**state, "version": np.array(5)})
    with pytest.raises(ValueError, match="loss catalog state is version 5, newer than this hf_r8 reads"):
        LossCatalog.load(tmp_path)


@pytest.mark.parametrize(("size", "alpha", "message"), [(0, 0.3, "empty dataset"), (5, 0.0, "alpha=0.0")])
def test_bad_construction_is_refused(size, alpha, message):
    with pytest.raises(ValueError, match=message):
        LossCatalog(size, alpha)


def test_out_of_range_indices_are_refused():
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        LossCatalog(3).update_exact([3], [1.0], step=1)


def test_update_queue_pads_gathers_and_applies_in_order():
    catalog = LossCatalog(10, alpha=0.5)
    queue = CatalogUpdateQueue(capacity=4)
    queue.record(torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor(2.0), step=0)
    queue.record(torch.tensor([1]), torch.tensor([3.0]), torch.tensor(3.0), step=1)
    assert len(queue) == 2 and not catalog.seen.any()  # nothing reaches the catalog before apply
    assert queue.apply(catalog) == 2 and len(queue) == 0
    assert catalog.ema_loss[[1, 2, 3]].tolist() == [2.0, 2.0, 3.0]  # 1.0 then blended halfway to 3.0
    assert catalog.usage.tolist() == [0, 2, 1, 1, 0, 0, 0, 0, 0, 0]  # padding rows touched nothing
    assert catalog.last_step[[1, 2]].tolist() == [1, 0]  # the step each micro-batch was recorded at


def test_update_queue_surprise_path_and_oversized_batches():
    catalog = LossCatalog(10)
    queue = CatalogUpdateQueue(capacity=2)
    queue.record(torch.tensor([4, 5]), None, torch.tensor(1.5), step=3)
    queue.apply(catalog, wait=True)
    assert catalog.ema_loss[[4, 5]].tolist() == [1.5, 1.5] and np.isnan(catalog.last_loss[4])
    with pytest.raises(ValueError, match="capacity 2"):
        queue.record(torch.tensor([1, 2, 3]), None, torch.tensor(1.0), step=4)
    with pytest.raises(ValueError, match="capacity=0"):
        CatalogUpdateQueue(capacity=0)
