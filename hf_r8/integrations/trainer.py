"""`R8Trainer` and `with_r8(TrainerClass)`: what a callback cannot do — own the train sampler and see
each example's loss.

* `get_train_dataloader` wraps the train dataset so every item carries its index past column removal
  and the data collator, whatever the items are (dicts, a `TensorDataset`'s tuples), keeping a
  `datasets.Dataset`'s batched fetch (`__getitems__`). A dict batch carries the indices as `r8_index`
  (popped before `model.forward`); any other batch reaches `compute_loss` exactly as the collator made it.
  It samples with `BalancedQuartileSampler` (seeded with `data_seed`, else `seed`, as the stock sampler):
  a cataloging epoch, then quartile-balanced batches.
* `compute_loss` returns exactly the stock loss (same call, same `num_items_in_batch`) and records
  each example's own loss, recomputed from the forward's outputs, which a hook keeps
  (`per_example.py`), once the first batches prove the recomputation is the model's own loss
  (`LossAgreement`); when it cannot be recomputed or disagrees, the batch loss feeds the catalog's
  surprise estimate (said once in the log).
* The recorded (index, loss) pairs are gathered from every process and copied to the host without
  blocking (`catalog_updates.py`); they reach the catalog once landed, and all of them before an epoch
  is planned or a checkpoint saved, so every rank plans from the same catalog without stalling the device.
* The catalog is saved as `r8_catalog.npz` in each checkpoint and loaded by `train(resume_from_checkpoint=...)`;
  resumed with a train set of another size, it and the saved epoch plan are dropped (with a warning).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, has_length

from hf_r8.control.events import Event
from hf_r8.control.resolve import ConfigLike, revalidate
from hf_r8.data.catalog import FILE_NAME, LossCatalog
from hf_r8.data.catalog_updates import CatalogUpdateQueue
from hf_r8.data.indexed_data import BATCH_KEY, INDEX_KEY, IndexCarryingCollator, IndexedDataset
from hf_r8.data.per_example import keep_first_training_output
from hf_r8.data.sampler import PLAN_FILE_NAME, BalancedQuartileSampler
from hf_r8.data.sampler_modes import SAMPLER_MODES
from hf_r8.integrations.callback import R8Callback
from hf_r8.integrations.compat import check_trainer_internals, keep_signature_column, train_batch_size
from hf_r8.integrations.example_losses import ExampleLosses
from hf_r8.runtime.moe import is_moe_model, split_router_groups

logger = logging.getLogger(__name__)

class R8CallbackMixin:
    """Adds an `R8Callback` built from `r8=` (default preset) to a Trainer and binds it to that Trainer;
    on a mixture-of-experts model, the optimizer it creates keeps the routers in groups of their own.

    An `R8Callback` already in `callbacks=` is the one used (one R8 adapts the LR), unless `r8=` names a
    config as well: which of the two was meant is then unclear, and it is refused.
    """

    def __init__(self, *args: Any, r8: ConfigLike = None, **kwargs: Any) -> None:
        callbacks = list(kwargs.get("callbacks") or [])
        passed = [callback for callback in callbacks if isinstance(callback, R8Callback)]
        if passed and r8 is not None:
            raise ValueError(f"{type(self).__name__}: got r8= and an R8Callback in callbacks=; pass the config once, "
                             "as r8=... (R8Trainer builds its own R8Callback) or as the R8Callback.")
        if passed:
            self.r8_callback = passed[0]
        else:
            self.r8_callback = R8Callback(r8)
            callbacks.append(self.r8_callback)
        self.r8_config = self.r8_callback.config
        kwargs["callbacks"] = callbacks
        super().__init__(*args, **kwargs)
        check_trainer_internals(type(self))
        self.r8_callback.bind(self)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        revalidate(self.r8_config)  # read here (moe) before on_train_begin checks it: fields may have been assigned
        created_here = self.optimizer is None  # a user's optimizer (and its scheduler) is left as it is
        optimizer = super().create_optimizer(*args, **kwargs)
        model = self.model
        if created_here and (is_moe_model(model) or self.r8_config.moe.enabled):
            added = split_router_groups(optimizer, model, self.r8_config.moe.router_patterns)
            if added:
                logger.info("R8: %d router parameter group(s) get the MoE profile.", added)
        return optimizer


class R8TrainerMixin(R8CallbackMixin):
    """The overrides `with_r8` adds to a Trainer class (see the module docstring)."""

    def __init__(self, *args: Any, r8: ConfigLike = None, **kwargs: Any) -> None:
        super().__init__(*args, r8=r8, **kwargs)
        SAMPLER_MODES.get(self.r8_config.sampler.mode)  # an unknown mode fails here, not at train()
        self.r8_catalog: LossCatalog | None = None
        self.r8_sampler: BalancedQuartileSampler | None = None
        self._r8_updates: CatalogUpdateQueue | None = None
        self.r8_example_losses = ExampleLosses(self)
        self._r8_resumed_plan: dict[str, np.ndarray] | None = None
        """The sampler's state in the checkpoint resumed from (`r8_epoch_plan.npz`), until the sampler exists."""
        self._r8_saved_into: str | None = None
        self._r8_catalog_paused = False

    # --------------------------------------------------------------------------------- sampling
    def _r8_owns_sampling(self) -> bool:
        dataset = self.train_dataset
        if not self.r8_config.sampler.enabled or dataset is None:
            return False
        if isinstance(dataset, torch.utils.data.IterableDataset) or not has_length(dataset):
            logger.warning("R8: the train dataset has no length (an IterableDataset?): stock sampling, no catalog.")
            return False
        if self.args.train_sampling_strategy == "group_by_length":
            raise ValueError("train_sampling_strategy='group_by_length' cannot be combined with R8's balanced "
                             "sampling: set R8Config.sampler.enabled=False or use the default sampling strategy")
        return True

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        if not self._r8_owns_sampling():
            return super().get_train_dataloader()
        self._r8_apply_all_updates()  # the previous dataloader's last micro-batches
        size = len(self.train_dataset)
        if self.r8_catalog is not None and self.r8_catalog.size != size:
            # A checkpoint (or an earlier train()) of another train set: its losses and plan name other examples.
            logger.warning("R8: the loss catalog holds %d examples but the train set has %d: its losses and "
                           "epoch plan are dropped, and a new catalog starts with a cataloging epoch.",
                           self.r8_catalog.size, size)
            self.r8_catalog = None
            self._r8_resumed_plan = None
        if self.r8_catalog is None:
            self.r8_catalog = LossCatalog(size, alpha=self.r8_config.sampler.catalog_alpha)
        batch_size = train_batch_size(self)
        self._r8_updates = CatalogUpdateQueue(batch_size)
        sampler_config = self.r8_config.sampler
        # The stock Trainer's data order follows data_seed when it is set (accelerate's seedable sampler).
        data_seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self.r8_sampler = BalancedQuartileSampler(
            self.r8_catalog, batch_size, seed=data_seed, proportions=sampler_config.proportions,
            before_plan=self._r8_apply_all_updates, on_plan=self._r8_log_plan, mode=sampler_config.mode,
            prune_ratio=sampler_config.prune_ratio, full_data_fraction=sampler_config.full_data_fraction,
            total_epochs=self._r8_planned_epochs())
        if self._r8_resumed_plan is not None:
            # Its epoch too: Accelerate's skip-batches wrapper hides the sampler from set_epoch. The replay of the
            # epoch's first batches, which Accelerate skips, leaves a stabilization still to come for later ones.
            self.r8_sampler.load_state_dict(self._r8_resumed_plan)
            self._r8_resumed_plan = None
        if not isinstance(self.data_collator, IndexCarryingCollator):
            self.data_collator = IndexCarryingCollator(self.data_collator)
        return self._get_dataloader(dataset=IndexedDataset(self.train_dataset), description="Training",
                                    batch_size=batch_size, sampler_fn=lambda _: self.r8_sampler,
                                    is_training=True)

    def _r8_planned_epochs(self) -> int:
        batches = math.ceil(len(self.train_dataset) / (train_batch_size(self) * self.args.world_size))
        steps_per_epoch = max(1, batches // self.args.gradient_accumulation_steps)
        if self.args.max_steps > 0:
            return math.ceil(self.args.max_steps / steps_per_epoch)
        return math.ceil(self.args.num_train_epochs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        keep_signature_column(self, INDEX_KEY)

    # ----------------------------------------------------------------------------------- losses
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        indices = inputs.pop(INDEX_KEY, None) if isinstance(inputs, MutableMapping) else None
        if indices is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs.get("labels")
        captured: list[Any] = []
        hook = model.register_forward_hook(keep_first_training_output(captured))
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        finally:
            hook.remove()
        loss = result[0] if return_outputs else result
        losses = None
        if captured and isinstance(captured[0], Mapping):
            losses = self.r8_example_losses.of(captured[0], labels, indices, num_items_in_batch)
            if losses is not None and self.r8_sampler is not None and self.r8_sampler.mode == "infobatch":
                loss = self.r8_example_losses.reweighted(loss, captured[0], labels, indices, num_items_in_batch,
                                                         self.r8_sampler)
        if losses is None:
            self.r8_example_losses.warn_fallback("R8: per-example losses cannot be recomputed for this model; the "
                                                 "catalog uses the batch-loss surprise estimate.")
        self._r8_record(indices, losses, loss)
        return (loss, *result[1:]) if return_outputs else loss

    @contextlib.contextmanager
    def r8_catalog_paused(self) -> Iterator[None]:
        """While the LR range test sweeps before training, the losses of its weights (thrown away after it) stay
        out of the catalog."""
        self._r8_catalog_paused = True
        try:
            yield
        finally:
            self._r8_catalog_paused = False

    def _r8_record(self, indices: torch.Tensor, losses: torch.Tensor | None, loss: torch.Tensor) -> None:
        if self._r8_updates is not None and not self._r8_catalog_paused:
            self._r8_updates.record(indices, losses, loss.detach().float().reshape(-1).mean(), self.state.global_step)

    def training_step(self, model: torch.nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._r8_updates is not None and self.r8_catalog is not None:
            self._r8_updates.apply(self.r8_catalog)  # only the copies that have landed: no waiting
        if not (isinstance(inputs, Mapping) and BATCH_KEY in inputs):
            return super().training_step(model, inputs, *args, **kwargs)
        # A batch that is not a mapping (a tuple): the stock compute_loss calls model(**inputs), so the user's
        # own compute_loss takes it, unchanged; the catalog gets the loss that compute_loss returns.
        with self._r8_recording_batch_loss(inputs[INDEX_KEY]):
            return super().training_step(model, inputs[BATCH_KEY], *args, **kwargs)

    @contextlib.contextmanager
    def _r8_recording_batch_loss(self, indices: torch.Tensor) -> Iterator[None]:
        """While one training step runs, the loss its `compute_loss` returns feeds the surprise estimate."""
        had_instance_attribute = "compute_loss" in self.__dict__
        compute_loss = self.compute_loss
        recorded = []

        def recording_compute_loss(*args: Any, **kwargs: Any) -> Any:
            result = compute_loss(*args, **kwargs)
            if recorded:
                return result  # a second call inside the step: the micro-batch is in the catalog already
            recorded.append(True)
            self.r8_example_losses.warn_fallback(
                "R8: the data collator returns a batch that is not a dict, so per-example losses cannot be "
                "recomputed from it; the catalog uses the batch-loss surprise estimate from the loss your "
                "compute_loss returns.")
            self._r8_record(indices, None, result[0] if isinstance(result, tuple) else result)
            return result

        self.compute_loss = recording_compute_loss
        try:
            yield
        finally:
            if had_instance_attribute:
                self.compute_loss = compute_loss
            else:
                del self.compute_loss

    def _r8_log_plan(self, epoch: int, description: str) -> None:
        self.r8_callback.record(Event(self.state.global_step, -1, "sampler", "plan", float(epoch - 1), float(epoch),
                                      f"epoch {epoch}: {description}", quantity="epoch"))

    def _r8_apply_all_updates(self) -> None:
        if self._r8_updates is not None and self.r8_catalog is not None:
            self._r8_updates.apply(self.r8_catalog, wait=True)

    # --------------------------------------------------------------------------- checkpointing
    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        run_dir = self._get_output_dir(trial=trial)
        self._r8_save_into(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"))
        self._r8_saved_into = None  # a later train() may write a checkpoint of the same name

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The stock `_save_checkpoint` pushes the folder before returning: R8's files must be in it by then.
        self._r8_save_into(checkpoint_folder)
        super()._push_from_checkpoint(checkpoint_folder)

    def _r8_save_into(self, folder: str) -> None:
        """The catalog and the epoch plan, into the checkpoint `folder` (once per checkpoint)."""
        if self.r8_catalog is None or self._r8_saved_into == folder:
            return
        self._r8_apply_all_updates()
        if self.args.should_save:
            self.r8_catalog.save(folder)
            if self.r8_sampler is not None and self.r8_sampler.current_epoch_plan is not None:
                np.savez(os.path.join(folder, PLAN_FILE_NAME), **self.r8_sampler.state_dict())
        self._r8_saved_into = folder

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        revalidate(self.r8_config)  # the dataloader reads it before on_train_begin: fields may have been assigned
        # True means "the last checkpoint"; when there is none, the stock Trainer raises: leave that to it.
        checkpoint = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else \
            resume_from_checkpoint
        if isinstance(checkpoint, str) and os.path.isfile(os.path.join(checkpoint, FILE_NAME)):
            self.r8_catalog = LossCatalog.load(checkpoint)
            plan_path = os.path.join(checkpoint, PLAN_FILE_NAME)
            if os.path.isfile(plan_path):
                with np.load(plan_path, allow_pickle=False) as saved:
                    self._r8_resumed_plan = dict(saved)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._r8_apply_all_updates()  # the last micro-batches of the run
        return output

    # ----------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.r8_catalog is not None and "learning_rate" in logs:
            logs.update({f"r8/{key}": value for key, value in self.r8_catalog.statistics().items()
                         if np.isfinite(value)})
        super().log(logs, *args, **kwargs)


def with_r8(trainer_class: type[Trainer]) -> type[Trainer]:
    """A subclass of `trainer_class` with R8's sampler, per-example losses and R8Callback.

    Trainers that bring their own train sampler or dataloader (TRL's GRPO and RLOO) keep it: the
    subclass then only adds R8Callback, and says so once.
    """
    own_sampling = (trainer_class.get_train_dataloader is not Trainer.get_train_dataloader
                    or trainer_class._get_train_sampler is not Trainer._get_train_sampler)
    if own_sampling:
        logger.warning("R8: %s brings its own sampler; R8 adds its callback only (no catalog).",
                       trainer_class.__name__)
        return type(f"{trainer_class.__name__}WithR8", (R8CallbackMixin, trainer_class), {})
    return type(f"{trainer_class.__name__}WithR8", (R8TrainerMixin, trainer_class), {})


class R8Trainer(R8TrainerMixin, Trainer):
    """`transformers.Trainer` with R8: adaptive LR (R8Callback), per-example loss catalog, balanced batches.

    Data: any map-style dataset the stock Trainer takes, with items of any kind its data collator takes
    (dicts, a `TensorDataset`'s tuples). When the collator returns a dict, the batch carries the example
    indices as `r8_index` (your own `compute_loss` may read it; R8's pops it before `model(**inputs)`) and the
    catalog gets each example's exact loss wherever R8 can recompute it and it agrees with the model's own
    loss. When the collator returns anything else (a tuple), the stock `compute_loss` cannot call the model
    (it calls `model(**inputs)`), so, as with `Trainer`, you override `compute_loss`: it receives the batch
    exactly as your collator made it, and the loss it returns feeds the catalog's batch-loss surprise
    estimate (said once in the log). The data order follows `args.data_seed`, else `args.seed`.

    Example:
        ```python
        trainer = R8Trainer(model=model, args=args, train_dataset=ds, r8=R8Config.from_preset("default"))
        trainer.train()
        ```
    """
