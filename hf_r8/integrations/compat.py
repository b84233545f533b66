"""Every use hf_r8 makes of transformers' internals, in one place, each failing loudly.

No public event of `transformers.Trainer` hands a callback the per-step loss, the gradient norm or the
Trainer itself, and no public hook lets a subclass own the train sampler's dataset or write files into a
checkpoint before it is pushed. hf_r8 reaches for these here, and only here:

* `find_trainer`: the Trainer, found in the callers' frames (a callback is never handed it);
* `wrap_method` / `unwrap_methods`: instance-level wrappers on `training_step`, `_get_grad_norm`, `log`
  (see `taps.py` for why each);
* `guard_train`: an instance-level wrapper on `train`, the one place every exception of a run passes through;
* `set_logged_lr`: the scheduler's `_last_lr`, so the logged `learning_rate` is the LR used;
* `scheduler_fields`, `load_scheduler_fields`, `scheduler_steps`: torch's `LRScheduler` counters, which
  `AdaptiveScheduler` saves as torch's schedulers do and reads to tell a step of its own;
* `mute_training_bar`: ProgressCallback's `training_bar`, silenced while the dashboard draws;
* `grad_scaler`, `uses_fsdp`: the accelerator's scaler and the parallelism in use;
* `end_dataloader_pass`, `set_accumulated_batches`: a pass over the train dataloader left early, and the
  micro-batch count `training_step` scales by, for the LR range test's sweep;
* `is_reward_trainer`: TRL's trainers that learn from rewards, whose loss does not measure the LR;
* DeepSpeed's engine (its skip flag, scheduler peaks, ZeRO partitions): `compat_deepspeed.py`, the same door
  for that library;
* `rebuilt_from_checkpoint`, `give_stateful_entry`: what `restore_callback_states_from_checkpoint` and a
  stock checkpoint do to a stateful callback;
* `TRAINER_INTERNALS`: the private methods R8Trainer overrides or calls;
* `train_batch_size`, `keep_signature_column`, `loss_scaled_across_processes`, `is_causal_lm_loss`: the
  Trainer's batch size and dataset columns, and how its `compute_loss` scales and shifts a loss (R8Trainer's
  sampler and per-example losses).

`check_trainer` runs when training starts: a missing internal is never a silent loss of a signal but a
warning that names it, what goes without it, and the transformers version. `tests/test_compat.py` pins
every name here against the installed transformers, so an upgrade that drops one fails a test first.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Callable
from typing import Any

import transformers
from transformers import Trainer, TrainerState
from transformers.trainer_callback import ProgressCallback

try:
    from transformers.loss.loss_utils import ForCausalLMLoss
except ImportError:  # warned about where it is needed (is_causal_lm_loss)
    ForCausalLMLoss = None

logger = logging.getLogger(__name__)

# The Trainer methods R8Callback wraps on the instance, and what it loses without each.
WRAPPED_METHODS = {
    "training_step": "the per-step loss (every rule, the guard and rollback)",
    "_get_grad_norm": "the gradient norm (the grad_norm rule, the guard's gradient check)",
    "log": "the r8/* metrics in the Trainer's logs",
}
# The private Trainer methods and attributes R8Trainer overrides or calls, and what needs each.
TRAINER_INTERNALS = {
    "_get_dataloader": "the train dataloader over the indexed dataset",
    "_set_signature_columns_if_needed": "keeping r8_index through column removal",
    "_save_checkpoint": "the catalog and epoch plan in each checkpoint",
    "_push_from_checkpoint": "the catalog in a checkpoint pushed to the Hub",
    "_get_output_dir": "the checkpoint folder to write the catalog into",
    "_get_train_sampler": "telling a foreign sampler (kept as it is) from the stock one",
}
# The private Trainer attributes R8Trainer reads (set on the instance), and what needs each.
TRAINER_ATTRIBUTES = {
    "_train_batch_size": "the batch size auto_find_batch_size chose (R8's sampler uses the configured one)",
    "_signature_columns": "keeping r8_index through column removal",
    "model_accepts_loss_kwargs": "InfoBatch's reweighting scaled across processes as the stock loss is",
    "compute_loss_func": "InfoBatch's reweighting scaled across processes as the stock loss is",
}
_REBUILT_MARKER = "r8_state"  # the attribute transformers sets on a callback it rebuilds from a checkpoint
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s (transformers %s)", message, transformers.__version__)


def check_trainer(trainer: Any) -> set[str]:
    """The wrapped methods `trainer` lacks, each warned once with what goes without it."""
    missing = {name for name in WRAPPED_METHODS if not callable(getattr(trainer, name, None))}
    for name in sorted(missing):
        _warn_once(f"method:{name}", f"R8: {type(trainer).__name__}.{name} does not exist: no {WRAPPED_METHODS[name]}")
    return missing


def check_trainer_internals(trainer_class: type) -> None:
    """Warn once per private Trainer method R8Trainer relies on and `trainer_class` lacks."""
    for name, purpose in TRAINER_INTERNALS.items():
        if not hasattr(trainer_class, name):
            _warn_once(f"internal:{name}", f"R8Trainer: Trainer.{name} does not exist: no {purpose}")


def find_trainer(callback: object) -> Trainer:
    """The Trainer whose callback handler holds `callback`, found among the callers' frames.

    A stock `Trainer(callbacks=[cb])` never hands itself to its callbacks; the event that is running right now
    was called from one of its methods, so `self` in a caller frame is it.
    """
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and any(cb is callback for cb in candidate.callback_handler.callbacks):
            return candidate
        frame = frame.f_back
    raise RuntimeError(
        f"{type(callback).__name__} must run inside transformers.Trainer: pass it as Trainer(callbacks=[...]) "
        "or call .bind(trainer) before trainer.train()"
    )


def wrap_method(owner: Any, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace `owner.name` on the instance by `make_wrapper(original)`; `unwrap_methods` puts it back."""
    original = getattr(owner, name)
    wrapper = make_wrapper(original)
    wrapper._r8_restore = (name in owner.__dict__, original)
    setattr(owner, name, wrapper)


def unwrap_methods(owner: Any, names: tuple[str, ...]) -> None:
    """Put back exactly what each name was before its wrappers (an instance attribute or the class method)."""
    for name in names:
        while (restore := getattr(owner.__dict__.get(name), "_r8_restore", None)) is not None:
            had_instance_attribute, original = restore
            if had_instance_attribute:
                setattr(owner, name, original)
            else:
                del owner.__dict__[name]


def guard_train(trainer: Any, on_error: Callable[[BaseException], None]) -> None:
    """Have `on_error(error)` called whenever `trainer.train()` raises, wherever in the run the exception came from
    (another callback, an evaluation, the data loader, an interrupt between steps): no callback event follows a
    `train()` that raised. Installed once per Trainer, on the instance, and kept for its lifetime."""
    if callable(getattr(vars(trainer).get("train"), "_r8_on_error", None)):
        return

    def make_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
        def train(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            except BaseException as error:  # KeyboardInterrupt too: a notebook's interrupt ends training here
                on_error(error)
                raise

        train._r8_on_error = on_error
        return train

    wrap_method(trainer, "train", make_wrapper)


def set_logged_lr(scheduler: Any, lrs: list[float]) -> None:
    """Make a torch scheduler report `lrs` as its last LR (the Trainer logs `get_last_lr()`); a scheduler without
    torch's `_last_lr` list is warned about once (the logged `learning_rate` is then its own, not the LR used)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate's AcceleratedScheduler wraps it
    if isinstance(getattr(inner, "_last_lr", None), list):
        inner._last_lr = lrs
    elif inner is not None:
        _warn_once(f"last_lr:{type(inner).__name__}",
                   f"R8: {type(inner).__name__} has no _last_lr list (torch's LRScheduler keeps one): the logged "
                   "learning_rate is the schedule's, not the LR R8 used")


# What torch's LRScheduler keeps besides its optimizer, by the names its own `state_dict()` gives them:
# AdaptiveScheduler saves and restores these as torch's schedulers do.
TORCH_SCHEDULER_FIELDS = ("last_epoch", "_step_count", "base_lrs", "_last_lr")


def scheduler_fields(scheduler: Any) -> dict[str, Any]:
    """A torch scheduler's own counters and LRs (`TORCH_SCHEDULER_FIELDS`), as plain data."""
    return {name: copy.copy(getattr(scheduler, name)) for name in TORCH_SCHEDULER_FIELDS}


def load_scheduler_fields(scheduler: Any, state: dict[str, Any]) -> None:
    """Put `scheduler_fields()` back; a state that lacks `_step_count` (hf_r8 <= 0.1) keeps the scheduler's."""
    for name in TORCH_SCHEDULER_FIELDS:
        if name in state:
            setattr(scheduler, name, copy.copy(state[name]))


def scheduler_steps(scheduler: Any) -> int:
    """How many times a torch scheduler's `step()` ran (`_step_count`, which its constructor's first step counts)."""
    return scheduler._step_count


def train_batch_size(trainer: Any) -> int:
    """The per-process train batch size: the Trainer's `_train_batch_size` (which `auto_find_batch_size` lowers),
    or, without it, `args.per_device_train_batch_size` (warned about once)."""
    size = getattr(trainer, "_train_batch_size", None)
    if isinstance(size, int):
        return size
    _warn_once("attribute:_train_batch_size",
               f"R8Trainer: Trainer._train_batch_size does not exist: no {TRAINER_ATTRIBUTES['_train_batch_size']}")
    return trainer.args.per_device_train_batch_size


def keep_signature_column(trainer: Any, column: str) -> None:
    """Keep `column` among the dataset columns the Trainer does not remove (`_signature_columns`, once set)."""
    columns = getattr(trainer, "_signature_columns", None)
    if not isinstance(columns, list):
        _warn_once("attribute:_signature_columns", f"R8Trainer: Trainer._signature_columns is not a list: no "
                   f"{TRAINER_ATTRIBUTES['_signature_columns']} (set remove_unused_columns=False if it goes)")
        return
    if column not in columns:
        columns.append(column)


def loss_scaled_across_processes(trainer: Any, num_items_in_batch: Any) -> bool:
    """Whether the stock `compute_loss` multiplies a loss averaged over `num_items_in_batch` by the process count:
    with `average_tokens_across_devices`, when the model takes loss kwargs or a `compute_loss_func` is set."""
    for name in ("model_accepts_loss_kwargs", "compute_loss_func"):
        if not hasattr(trainer, name):
            _warn_once(f"attribute:{name}", f"R8Trainer: Trainer.{name} does not exist: no {TRAINER_ATTRIBUTES[name]}")
    takes_item_count = getattr(trainer, "model_accepts_loss_kwargs", False) or \
        getattr(trainer, "compute_loss_func", None) is not None
    return bool(trainer.args.average_tokens_across_devices and num_items_in_batch is not None and takes_item_count)


def is_causal_lm_loss(model: Any) -> bool:
    """Whether `model` computes transformers' causal-LM loss (`ForCausalLMLoss`: labels shifted by one token)."""
    if ForCausalLMLoss is None:
        _warn_once("loss:ForCausalLMLoss", "R8Trainer: transformers.loss.loss_utils.ForCausalLMLoss does not exist: "
                   "causal LMs' per-example losses are not shifted, disagree with the model's, and R8 falls back to "
                   "the batch-loss estimate")
        return False
    return getattr(model, "loss_function", None) is ForCausalLMLoss


_MUTED_EVENTS = ("on_train_begin", "on_step_end", "on_log")


def _print_other_logs(args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """The muted bar's `on_log`: training logs are on the dashboard; evaluation metrics and the final
    summary are printed as the bar would have written them."""
    if state.is_world_process_zero and logs and "learning_rate" not in logs:
        print(logs)


def mute_training_bar(callbacks: list[Any]) -> Callable[[], None] | None:
    """Silence the Trainer's tqdm training bar (its `ProgressCallback`) for one run.

    Its training events become no-ops on the instance (evaluation metrics and the final summary are
    still printed); its own `on_train_end` puts them back (it runs after R8Callback's, so it must not
    find a bar to close). Evaluation bars are untouched. Returns a function that unmutes at once (for a
    run that never reaches `on_train_end`), or None when there is no bar to mute.
    """
    progress = next((callback for callback in callbacks if isinstance(callback, ProgressCallback)), None)
    if progress is None or "on_train_end" in vars(progress):
        return None
    if getattr(progress, "training_bar", None) is not None:  # it ran first (added before R8Callback)
        progress.training_bar.close()
        progress.training_bar = None

    def unmute(*args: Any, **kwargs: Any) -> None:
        for name in (*_MUTED_EVENTS, "on_train_end"):
            vars(progress).pop(name, None)

    for name in _MUTED_EVENTS:
        setattr(progress, name, lambda *args, **kwargs: None)
    progress.on_log = _print_other_logs
    progress.on_train_end = unmute
    return unmute


def grad_scaler(trainer: Any) -> Any:
    """The fp16 gradient scaler of the Trainer's accelerator, or None."""
    return getattr(getattr(trainer, "accelerator", None), "scaler", None)


# TRL's trainers whose training loss does not measure the LR (GRPO's is ~0 by construction): found by class name
# anywhere in the trainer's class hierarchy, so TRL is not imported and subclasses count.
REWARD_TRAINERS = ("GRPOTrainer", "RLOOTrainer", "PPOTrainer", "OnlineDPOTrainer", "NashMDTrainer", "XPOTrainer")


def is_reward_trainer(trainer: Any) -> bool:
    """Whether `trainer` is (a subclass of) one of TRL's reward-driven trainers (`REWARD_TRAINERS`)."""
    return any(cls.__name__ in REWARD_TRAINERS for cls in type(trainer).__mro__)


def end_dataloader_pass(dataloader: Any) -> None:
    """End a pass over `dataloader` left before its end. Accelerate's prepared dataloader registers itself with
    the accelerator's gradient state when a pass begins and unregisters when the pass ends; a generator left
    early never reaches that end, so it is called here, and the Trainer's own pass starts as on a fresh one."""
    end = getattr(dataloader, "end", None)
    if callable(end):
        end()


def set_accumulated_batches(trainer: Any, count: int) -> None:
    """Tell `trainer.training_step` how many micro-batches the step it is part of has, as the Trainer's loop does
    before calling it (`current_gradient_accumulation_steps`: the loss is scaled by it when the model's loss is not
    normalised by `num_items_in_batch`)."""
    if not hasattr(trainer, "get_batch_samples"):
        raise RuntimeError(f"R8: transformers {transformers.__version__}'s Trainer has no get_batch_samples: the LR "
                           "range test cannot take the Trainer's batches")
    trainer.current_gradient_accumulation_steps = count


def uses_fsdp(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def rebuilt_from_checkpoint(callback: object) -> bool:
    """Whether `restore_callback_states_from_checkpoint` built `callback` from a checkpoint (it then sets
    the saved attributes on the new instance and swaps it in for the user's)."""
    return _REBUILT_MARKER in vars(callback)


def give_stateful_entry(state: TrainerState, name: str, entry: dict[str, Any]) -> None:
    """A checkpoint saved without the callback `name` (a stock Trainer's) has no entry for it, and
    transformers' next checkpoint save fails with KeyError(name): give it one."""
    state.stateful_callbacks.setdefault(name, entry)
