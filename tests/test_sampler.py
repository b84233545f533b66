"""BalancedQuartileSampler: the cataloging epoch, quartile mix per batch, usage preference, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from hf_r8.data.catalog import LossCatalog
from hf_r8.data.sampler import BalancedQuartileSampler, batch_counts
from hf_r8.data.sampler_modes import (
    SAMPLER_MODES,
    EpochPlan,
    SamplerMode,
    register_sampler_mode,
    registered_sampler_modes,
)


def cataloged(size=64, seed=0):
    catalog = LossCatalog(size)
    catalog.update_exact(np.arange(size), np.random.default_rng(seed).random(size), step=1)
    return catalog


def test_batch_counts_use_largest_remainder():
    assert batch_counts((0.25, 0.25, 0.25, 0.25), 8).tolist() == [2, 2, 2, 2]
    assert batch_counts((1, 1, 1, 1), 6).tolist() == [2, 2, 1, 1]
    assert batch_counts((0, 0, 1, 3), 8).tolist() == [0, 0, 2, 6]
    with pytest.raises(ValueError, match="proportions"):
        batch_counts((1, 1), 8)


def test_first_epoch_visits_every_example_once_in_a_seeded_order():
    sampler = BalancedQuartileSampler(LossCatalog(50), batch_size=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert first == list(BalancedQuartileSampler(LossCatalog(50), batch_size=8, seed=3))


def test_later_epochs_mix_quartiles_in_every_batch():
    catalog = cataloged()
    sampler = BalancedQuartileSampler(catalog, batch_size=8, seed=0)
    sampler.set_epoch(1)
    plan = sampler.plan().reshape(-1, 8)
    quartiles = catalog.quartiles()
    for batch in plan:
        assert np.bincount(quartiles[batch], minlength=4).tolist() == [2, 2, 2, 2]
    assert sorted(plan.reshape(-1).tolist()) == list(range(64))  # equal quartiles: everyone once


def test_within_a_quartile_the_least_used_come_first():
    catalog = cataloged(size=40)
    catalog.update_exact(np.arange(0, 40, 2), catalog.ema_loss[0:40:2], step=2)  # even ones used twice
    sampler = BalancedQuartileSampler(catalog, batch_size=4, proportions=(1, 0, 0, 0))
    sampler.set_epoch(1)
    plan = sampler.plan()
    q1 = np.flatnonzero(catalog.quartiles() == 0)
    least_used = set(q1[catalog.usage[q1] == catalog.usage[q1].min()].tolist())
    whole_batches = -(-len(least_used) // 4) * 4  # batches are shuffled inside, so look at whole batches
    assert least_used <= set(plan[:whole_batches].tolist())


def test_plan_is_deterministic_per_seed_and_epoch_and_changes_with_them():
    catalog = cataloged()
    plans = {}
    for seed, epoch in [(0, 1), (0, 1), (0, 2), (1, 1)]:
        sampler = BalancedQuartileSampler(catalog, batch_size=8, seed=seed)
        sampler.set_epoch(epoch)
        plans.setdefault((seed, epoch), []).append(sampler.plan().tolist())
    assert plans[(0, 1)][0] == plans[(0, 1)][1]
    assert plans[(0, 1)][0] != plans[(0, 2)][0] and plans[(0, 1)][0] != plans[(1, 1)][0]


def test_stabilize_switches_to_q1_inside_the_epoch_under_way():
    catalog = cataloged()
    sampler = BalancedQuartileSampler(catalog, batch_size=8)
    sampler.set_epoch(1)
    order = iter(sampler)
    first_batch = [next(order) for _ in range(8)]
    sampler.stabilize(3)  # a rollback while batch 2 has not been drawn yet
    rest = list(order)
    quartiles = catalog.quartiles()
    assert (quartiles[first_batch] != 0).any()
    assert (quartiles[rest[:24]] == 0).all()  # batches 2-4
    assert (quartiles[rest[24:32]] != 0).any()
    assert sampler.stabilize_batches == 0
    assert sampler.current_epoch_plan[1][8:32].tolist() == rest[:24]  # a checkpoint replays what was served


def stabilizing(catalog, batches_served, batches_asked):
    """A sampler in epoch 1 of `catalog` (batches of 8), asked for `batches_asked` low-loss batches after serving
    `batches_served`; with its iterator and what it served."""
    sampler = BalancedQuartileSampler(catalog, batch_size=8)
    sampler.set_epoch(1)
    order = iter(sampler)
    served = [next(order) for _ in range(batches_served * 8)]
    sampler.stabilize(batches_asked)
    return sampler, order, served


def test_a_stabilization_longer_than_the_epoch_left_carries_the_rest_into_the_next_epoch():
    catalog = cataloged()  # 8 batches of 8 per epoch
    sampler, order, served = stabilizing(catalog, 4, 6)  # 4 batches left in this epoch: 2 are owed to the next
    served += list(order)
    assert sampler.stabilize_batches == 2
    sampler.set_epoch(2)
    following = list(sampler)
    quartiles = catalog.quartiles()
    assert (quartiles[served[32:]] == 0).all() and (quartiles[following[:16]] == 0).all()
    assert (quartiles[following[16:24]] != 0).any() and sampler.stabilize_batches == 0


def test_unseen_examples_count_as_the_hardest_quartile_and_tiny_datasets_work():
    catalog = LossCatalog(3)
    catalog.update_exact([0], [1.0], step=1)
    sampler = BalancedQuartileSampler(catalog, batch_size=8)
    sampler.set_epoch(1)
    plan = sampler.plan()
    assert len(plan) == 3 and set(plan.tolist()) <= {0, 1, 2}


def test_infobatch_prunes_well_learned_examples_and_reweights_the_kept_ones():
    catalog = cataloged(size=400)
    sampler = BalancedQuartileSampler(catalog, batch_size=8, mode="infobatch", prune_ratio=0.5, total_epochs=8)
    sampler.set_epoch(1)
    plan = sampler.plan()
    well_learned = catalog.ema_loss < catalog.ema_loss.mean()
    planned = np.zeros(400, dtype=bool)
    planned[plan] = True
    assert planned[~well_learned].all()  # every hard example stays
    pruned = well_learned & ~planned
    assert 0.3 < pruned.sum() / well_learned.sum() < 0.7  # about half of the easy ones are left out
    assert (sampler.loss_weights[well_learned & planned] == 2.0).all()
    assert (sampler.loss_weights[~well_learned] == 1.0).all() and len(plan) == 400
    sampler.set_epoch(7)  # the last 12.5% of 8 epochs: full data, no reweighting
    assert sorted(sampler.plan().tolist()) == list(range(400)) and (sampler.loss_weights == 1.0).all()


def test_uniform_mode_is_a_fresh_permutation_every_epoch():
    sampler = BalancedQuartileSampler(cataloged(), batch_size=8, mode="uniform")
    sampler.set_epoch(3)
    plan = sampler.plan().tolist()
    assert sorted(plan) == list(range(64)) and (sampler.loss_weights == 1.0).all()


class HardestFirst(SamplerMode):
    """A user's mode: the highest EMA loss first, and those examples count double."""

    def plan(self, context, rng):
        order = np.argsort(-context.catalog.ema_loss, kind="stable")
        loss_weights = np.ones(context.catalog.size)
        loss_weights[order[: context.batch_size]] = 2.0
        return EpochPlan(order, loss_weights)

    def describe(self, context):
        return f"hardest first, the first {context.batch_size} weighted x2"


class HalfAnEpoch(SamplerMode):
    """A user's mode that forgets half the examples."""

    def plan(self, context, rng):
        return EpochPlan(np.arange(context.catalog.size // 2))

    def describe(self, context):
        return "half"


@pytest.fixture
def user_modes(monkeypatch):
    """`hardest_first` registered for one test."""
    monkeypatch.setattr(SAMPLER_MODES, "_classes", dict(SAMPLER_MODES._classes))
    register_sampler_mode("hardest_first", HardestFirst)
    register_sampler_mode("half", HalfAnEpoch)


def test_a_registered_sampler_mode_plans_the_epochs_after_the_cataloging_one(user_modes):
    catalog = cataloged()
    plans = []
    sampler = BalancedQuartileSampler(catalog, batch_size=8, mode="hardest_first",
                                      on_plan=lambda epoch, kind: plans.append((epoch, kind)))
    cataloging = list(sampler)
    sampler.set_epoch(1)
    planned = list(sampler)
    assert sorted(cataloging) == list(range(64)) and cataloging != planned
    assert planned == np.argsort(-catalog.ema_loss, kind="stable").tolist()
    assert (sampler.loss_weights[planned[:8]] == 2.0).all() and (sampler.loss_weights[planned[8:]] == 1.0).all()
    assert plans == [(0, "cataloging epoch, every example once in a seeded order"),
                     (1, "hardest first, the first 8 weighted x2")]
    assert registered_sampler_modes() == ("balanced", "infobatch", "uniform", "hardest_first", "half")


def test_a_mode_whose_plan_misses_examples_is_refused_by_name(user_modes):
    sampler = BalancedQuartileSampler(cataloged(), batch_size=8, mode="half")
    sampler.set_epoch(1)
    with pytest.raises(ValueError, match="sampler mode 'half' planned 32 indices for 64 examples"):
        list(sampler)


def test_an_unknown_sampler_mode_is_refused_naming_the_registered_ones(user_modes):
    with pytest.raises(ValueError, match=r"sampler.mode: 'hardest' is not registered: must be one of \['balanced', "
                                         r"'infobatch', 'uniform', 'hardest_first', 'half'\] \(add one with "
                                         r"hf_r8.data.sampler_modes.register_sampler_mode\)"):
        BalancedQuartileSampler(cataloged(), batch_size=8, mode="hardest")


@pytest.mark.parametrize(("name", "mode", "error", "message"), [
    ("balanced", HardestFirst, ValueError, "'balanced' is built into hf_r8"),
    ("mine", object, TypeError, "must be a subclass of hf_r8.data.sampler_modes.SamplerMode"),
])
def test_register_sampler_mode_refuses_taken_names_and_non_modes(user_modes, name, mode, error, message):
    with pytest.raises(error, match=message):
        register_sampler_mode(name, mode)
    assert "mine" not in registered_sampler_modes()


def test_a_resumed_sampler_replayed_from_the_start_serves_a_pending_stabilization_where_the_saved_one_would():
    catalog = cataloged()  # 8 batches of 8 per epoch
    # Requested, not reached yet: the next batch the sampler draws is the first of it.
    straight, order, served = stabilizing(catalog, 3, 2)
    saved = {key: np.copy(value) if isinstance(value, np.ndarray) else value
             for key, value in straight.state_dict().items()}
    served += list(order)

    resumed = BalancedQuartileSampler(catalog, batch_size=8)
    resumed.load_state_dict(saved)
    replayed = list(resumed)  # Accelerate skips the first 3 batches of this replay: they were trained on
    assert replayed == served and resumed.stabilize_batches == 0
    assert (catalog.quartiles()[replayed[24:40]] == 0).all()


def test_an_unversioned_plan_file_loads_and_a_newer_one_is_refused():
    catalog = cataloged()
    sampler = BalancedQuartileSampler(catalog, batch_size=8)
    sampler.set_epoch(1)
    plan = sampler.plan()
    old = BalancedQuartileSampler(catalog, batch_size=8)
    old.load_state_dict({"epoch": np.array(1), "plan": plan, "loss_weights": np.ones(64)})  # hf_r8 <= 0.3
    assert list(old) == plan.tolist()
    with pytest.raises(ValueError, match="sampler plan state is version 9"):
        old.load_state_dict({**sampler.state_dict(), "version": 9})
