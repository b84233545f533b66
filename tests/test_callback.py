"""R8Callback on a stock transformers.Trainer: real runs of a tiny GPT-2 for a few dozen steps."""

from __future__ import annotations

import gc
import json
import math
import weakref

import pytest
import torch
from transformers import Trainer, TrainerCallback, get_scheduler

from hf_r8 import R8Callback, R8Config
from hf_r8.control.config import RollbackConfig
from hf_r8.ui.run_log import METRICS_FILE, RUN_DIR, read_jsonl
from tests.trainer_setup import ScriptedLossModel, as_saved_by_version_2, training_args

pytestmark = pytest.mark.integration


class UsedLearningRates(TrainerCallback):
    """Records the LR each param group has when `optimizer.step()` actually runs (a step pre-hook)."""

    def __init__(self):
        self.used: list[list[float]] = []
        self.momenta: list[list[float | None]] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.register_step_pre_hook(self._record)

    def _record(self, optimizer, args, kwargs):
        self.used.append([float(group["lr"]) for group in optimizer.param_groups])
        self.momenta.append([group["betas"][0] if "betas" in group else group.get("momentum")
                             for group in optimizer.param_groups])


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def train(model, dataset, tmp_path, callbacks, **args):
    trainer = Trainer(model=model, args=training_args(tmp_path, **args), train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    return trainer


def healthy(step):
    """Fast, then slowing improvement, with a little deterministic batch-to-batch noise (+-0.5%)."""
    return (1.0 + 4.0 * math.exp(-step / 20)) * (1.0 + 0.005 * math.sin(1.7 * step))


def test_lr_used_equals_lr_logged_equals_schedule_times_gain(model, lm_dataset, tmp_path):
    r8, recorder = R8Callback.from_preset("aggressive"), UsedLearningRates()
    scripted = ScriptedLossModel(model, healthy)
    trainer = train(scripted, lm_dataset, tmp_path, [r8, recorder], max_steps=60, warmup_steps=5,
                    lr_scheduler_type="cosine")
    used = [lrs[0] for lrs in recorder.used]
    logged_lrs = logged(trainer, "learning_rate")
    gains = logged(trainer, "r8/lr_gain")
    assert len(used) == len(logged_lrs) == len(gains) == 60
    assert used == pytest.approx(logged_lrs, rel=1e-12)

    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_scheduler("cosine", reference, num_warmup_steps=5, num_training_steps=60)
    lr_min, lr_max = r8.controller.lr_bounds(0)
    expected = []
    for gain in gains:
        schedule_lr = reference.param_groups[0]["lr"]
        expected.append(min(lr_max, max(min(lr_min, schedule_lr), schedule_lr * gain)))
        reference.step()
        schedule.step()
    assert used == pytest.approx(expected, rel=1e-12)
    assert max(gains) > 1.1, "the controller never acted: the test would prove nothing"
    assert all(lrs[0] == lrs[1] for lrs in recorder.used)  # both Trainer param groups get the same gain


def test_healthy_training_lr_rises_then_settles(model, lm_dataset, tmp_path):
    r8 = R8Callback()
    trainer = train(ScriptedLossModel(model, healthy), lm_dataset, tmp_path, [r8], max_steps=100)
    gains = logged(trainer, "r8/lr_gain")
    assert gains[0] == 1.0
    assert max(gains[:60]) > 1.2
    # the decision engine only ever increased, and stopped once improvement slowed; the grad-norm rule reacts to
    # the real gradients (a shrink is given back 30 steps later when no other jump follows), and only it moved the
    # gain after that
    assert {event.action for event in r8.events if event.rule == "decision"} == {"increase"}
    late = [event for event in r8.events if event.step > 75 and event.group == 0]
    assert all(event.rule == "grad_norm" for event in late), "the gain should have settled once improvement slowed"
    assert len(set(gains[75:])) <= 1 + len(late)


def test_stuck_training_lr_falls_after_patience(model, lm_dataset, tmp_path):
    r8 = R8Callback()
    trainer = train(ScriptedLossModel(model, lambda step: 3.0 + 0.01 * (step % 2)), lm_dataset, tmp_path, [r8],
                    max_steps=45)
    gains = logged(trainer, "r8/lr_gain")
    decisions = [(event.step, event.action) for event in r8.events if event.group == 0]
    assert decisions[0] == (15, "decrease"), "patience: two plateau windows of 5 steps before the first cut"
    assert gains[:15] == [1.0] * 15
    assert gains[15] < 1.0 and gains[-1] < gains[15]
    assert "plateau" in next(event for event in r8.events if event.group == 0).reason


def test_diverging_training_hits_the_spike_brake(model, lm_dataset, tmp_path):
    def diverging(step):
        return 2.0 - 0.01 * step + 0.02 * (step % 2) if step <= 30 else 2.0 * 1.5 ** (step - 30)

    config = R8Config.from_preset("default")
    config.rollback = RollbackConfig(enabled=False)  # the controller's own brake, without rollback (test_rollback.py)
    r8 = R8Callback(config)
    trainer = train(ScriptedLossModel(model, diverging), lm_dataset, tmp_path, [r8], max_steps=45)
    gains = logged(trainer, "r8/lr_gain")
    brakes = [event.step for event in r8.events if event.action == "spike_decrease" and event.group == 0]
    assert brakes == [31, 41], "brake at once, then again after spike_cooldown_steps while it still diverges"
    assert gains[31] == pytest.approx(0.5 * gains[30], rel=1e-12)  # used from step 32 on
    assert gains[-1] == pytest.approx(0.25 * gains[30], rel=1e-12)


def test_moe_profile_bounds_are_tighter_and_changes_gentler(tokenizer, lm_dataset, tmp_path):
    from hf_r8.demo.offline import tiny_gpt2

    def gains_for(preset):
        callback = R8Callback.from_preset(preset)
        model = tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
        script = ScriptedLossModel(model, lambda step: 10.0 * 0.97 ** step)
        trainer = train(script, lm_dataset, tmp_path / preset, [callback], max_steps=120)
        bounds = {"default": (0.01, 20.0), "moe": (0.1, 2.0)}[preset]
        assert callback.controller.gain_bounds == [pytest.approx(bounds)] * 2
        return logged(trainer, "r8/lr_gain")

    default, moe = gains_for("default"), gains_for("moe")
    moe_steps = [b / a for a, b in zip(moe, moe[1:], strict=False)]
    default_steps = [b / a for a, b in zip(default, default[1:], strict=False)]
    assert 1.0 < max(moe) <= 2.0 and max(moe) < max(default)
    assert max(moe_steps) <= 1.15 and max(moe_steps) < max(default_steps)
    assert min(moe_steps) >= 0.85


def test_nan_loss_does_not_poison_the_controller(model, lm_dataset, tmp_path):
    config = R8Config.from_preset("default")
    config.rollback = RollbackConfig(enabled=False, guard_nonfinite=False)  # the NaN reaches the controller
    r8 = R8Callback(config)
    trainer = train(ScriptedLossModel(model, lambda step: float("nan") if step == 20 else 3.0 - 0.01 * step),
                    lm_dataset, tmp_path, [r8], max_steps=30)
    assert r8.controller.loss.nonfinite_count == 1
    assert all(math.isfinite(value) for value in logged(trainer, "r8/loss_ema"))
    assert all(math.isfinite(value) and value > 0 for value in logged(trainer, "learning_rate"))
    assert any(event.reason == "non-finite loss" for event in r8.events)


def test_per_step_loss_needs_no_logging_every_step(model, lm_dataset, tmp_path, tokenizer):
    from hf_r8.demo.offline import tiny_gpt2

    every_step = R8Callback()
    trainer = train(model, lm_dataset, tmp_path / "a", [every_step], max_steps=12, gradient_accumulation_steps=2)
    sparse = R8Callback()
    twin = tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    train(twin, lm_dataset, tmp_path / "b", [sparse], max_steps=12, gradient_accumulation_steps=2, logging_steps=50)
    losses = logged(trainer, "loss")
    # the last step's signal is still pending when training ends (it is consumed one step later)
    assert list(every_step.controller.loss.rolling) == pytest.approx(losses[-6:-1], rel=1e-5)
    assert list(sparse.controller.loss.rolling) == pytest.approx(list(every_step.controller.loss.rolling), rel=1e-6)
    assert every_step.controller.grad_slow.count == 11


@pytest.mark.parametrize("restore_flag", [False, True])
def test_resume_reproduces_lr_trajectory(tokenizer, lm_dataset, tmp_path, restore_flag):
    from hf_r8.demo.offline import tiny_gpt2

    def fresh_model():
        return tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64, seed=1)

    common = dict(max_steps=40, learning_rate=3e-3, save_strategy="steps", save_steps=20, warmup_steps=4,
                  lr_scheduler_type="linear", restore_callback_states_from_checkpoint=restore_flag)
    uninterrupted = train(fresh_model(), lm_dataset, tmp_path / "a", [R8Callback.from_preset("aggressive")],
                          **common)
    resumed = Trainer(model=fresh_model(), args=training_args(tmp_path / "b", **common), train_dataset=lm_dataset,
                      callbacks=[R8Callback.from_preset("aggressive")])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-20"))

    def trajectory(trainer, key):
        history = trainer.state.log_history
        return [(entry["step"], entry[key]) for entry in history if key in entry and entry["step"] > 20]

    gains = trajectory(uninterrupted, "r8/lr_gain")
    assert len({gain for _, gain in gains}) > 1, "no decision after the checkpoint: the test would prove nothing"
    assert trajectory(resumed, "r8/lr_gain") == gains
    resumed_lrs, uninterrupted_lrs = trajectory(resumed, "learning_rate"), trajectory(uninterrupted, "learning_rate")
    assert [step for step, _ in resumed_lrs] == [step for step, _ in uninterrupted_lrs] == list(range(21, 41))
    assert [lr for _, lr in resumed_lrs] == pytest.approx([lr for _, lr in uninterrupted_lrs], rel=1e-9)


def test_metrics_reach_tensorboard_and_log_history(model, lm_dataset, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    recorder = UsedLearningRates()
    trainer = train(model, lm_dataset, tmp_path, [R8Callback(), recorder], max_steps=20, logging_steps=5,
                    report_to=["tensorboard"])
    assert all("r8/lr_gain" in entry and "r8/decision" in entry for entry in trainer.state.log_history
               if "loss" in entry)
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/r8/lr_gain", "train/r8/loss_ema", "train/r8/decision", "train/r8/grad_norm_ema"} <= set(tags)
    assert [event.step for event in events.Scalars("train/r8/lr_gain")] == [5, 10, 15, 20]
    tb_lrs = [event.value for event in events.Scalars("train/learning_rate")]
    assert tb_lrs == pytest.approx([recorder.used[step - 1][0] for step in (5, 10, 15, 20)], rel=1e-6)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam", "adagrad"])
def test_momentum_is_written_only_where_the_optimizer_has_one(model, lm_dataset, tmp_path, optimizer_name):
    optimizer = {
        "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
        "adam": lambda params: torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95)),
        "adagrad": lambda params: torch.optim.Adagrad(params, lr=1e-2),
    }[optimizer_name](model.parameters())
    config = R8Config(momentum=R8Config().momentum.__class__(rule="inverse", loss_scale=0.1))
    r8, recorder = R8Callback(config), UsedLearningRates()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=8), train_dataset=lm_dataset,
                      callbacks=[r8, recorder], optimizers=(optimizer, None))
    trainer.train()
    momenta = [values[0] for values in recorder.momenta]
    if optimizer_name == "adagrad":
        assert momenta == [None] * 8 and "momentum" not in optimizer.param_groups[0]
        return
    assert momenta[0] == 0.9  # nothing observed yet
    assert momenta[-1] != 0.9 and 0.0 <= momenta[-1] <= 0.999
    loss_ema = r8.controller.loss.ema.value
    assert momenta[-1] == pytest.approx(1 - 1 / (1 + 0.1 * loss_ema), rel=0.05)
    if optimizer_name == "adam":
        assert optimizer.param_groups[0]["betas"][1] == 0.95


def test_callback_from_yaml_and_preset(tmp_path):
    path = tmp_path / "r8.yaml"
    path.write_text("base: conservative\nrules: [decision]\n")
    assert R8Callback.from_yaml(path).config.rules == ["decision"]
    assert R8Callback.from_yaml(path).config.decision == R8Config.from_preset("conservative").decision
    assert R8Callback(R8Config.from_preset("moe")).config.moe.enabled


def test_metric_driven_scheduler_keeps_its_own_lr(model, lm_dataset, tmp_path):
    r8, recorder = R8Callback.from_preset("aggressive"), UsedLearningRates()
    scripted = ScriptedLossModel(model, healthy)
    args = training_args(tmp_path, max_steps=40, lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps",
                         eval_steps=10)
    trainer = Trainer(model=scripted, args=args, train_dataset=lm_dataset, eval_dataset=lm_dataset.select(range(16)),
                      callbacks=[r8, recorder])
    trainer.train()
    gains = logged(trainer, "r8/lr_gain")
    assert max(gains) > 1.0
    assert [lrs[0] for lrs in recorder.used] == pytest.approx(logged(trainer, "learning_rate"), rel=1e-12)
    # between steps the optimizer holds the plateau scheduler's own value, never schedule x gain
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


class CrashAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated crash")


class TapDepth(TrainerCallback):
    """How many R8 taps are stacked on `training_step` while training runs."""

    def __init__(self, trainer):
        self.trainer, self.depths = trainer, []

    def on_step_begin(self, args, state, control, **kwargs):
        depth, method = 0, self.trainer.training_step
        while hasattr(method, "_r8_restore"):
            depth, method = depth + 1, method._r8_restore[1]
        self.depths.append(depth)


def test_training_again_after_a_crash_taps_the_trainer_once(model, lm_dataset, tmp_path):
    r8, crash = R8Callback(), CrashAtStep()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=8), train_dataset=lm_dataset,
                      callbacks=[r8, crash])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not hasattr(trainer.training_step, "_r8_restore"), "the crash left the taps in place"
    trainer.remove_callback(crash)
    depth = TapDepth(trainer)
    trainer.add_callback(depth)
    trainer.train()
    assert depth.depths == [1] * 8
    assert list(r8.controller.loss.rolling) == pytest.approx(logged(trainer, "loss")[-6:-1], rel=1e-5)
    assert not {"training_step", "log", "_get_grad_norm"} & set(trainer.__dict__)


def test_a_trainer_with_its_own_update_loop_trains_at_the_controllers_lr(model, lm_dataset, tmp_path, caplog):
    # Such a Trainer (TRL's PPOTrainer) fires on_step_end per update but no on_pre_optimizer_step: the default's
    # range test has run before the first step, and the LR comes from the controller, set once per update.
    r8, recorder = R8Callback(), UsedLearningRates()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=160, learning_rate=1e-3, logging_steps=500),
                      train_dataset=lm_dataset, callbacks=[r8, recorder])
    for event in ("on_pre_optimizer_step", "on_optimizer_step"):
        setattr(trainer.callback_handler, event, lambda args, state, control, **kwargs: control)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "runs its own loop" in caplog.text and "non-finite guard and rollback are off" in caplog.text
    used = [lrs[0] for lrs in recorder.used]
    chosen = r8.controller.specs[0].initial_gain
    assert [event.action for event in r8.events if event.rule == "range_test"] == ["rebase"]
    assert len(used) == 160 and max(used) <= 1e-3 * chosen * 20  # within the bounds: never a sweep gain
    assert r8.state()["attributes"]["r8_state"]["engine"]["range_test_running"] is False


def test_bad_config_fails_at_construction():
    with pytest.raises(ValueError, match="decision.increase_factor=0.5: must be > 1"):
        R8Callback({"decision": {"increase_factor": 0.5}})
    with pytest.raises(TypeError, match="config=3: must be an R8Config, a dict, a preset name, a YAML path or None"):
        R8Callback(3)
    with pytest.raises(ValueError, match="config='no-such-preset': must be a preset"):
        R8Callback("no-such-preset")


def test_every_adapter_takes_a_config_the_same_ways(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: aggressive\ndecision:\n  patience_windows: 7\n")
    aggressive = R8Config.from_preset("aggressive")
    assert R8Callback("aggressive").config == aggressive
    assert R8Callback(aggressive.to_dict()).config == aggressive
    assert R8Callback(tmp_path / "mine.yaml").config.decision.patience_windows == 7
    assert R8Callback(str(tmp_path / "mine.yaml")).config.decision.patience_windows == 7
    assert R8Callback().config == R8Config.from_preset("default")


def test_callback_outside_a_trainer_explains_itself():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    callback = R8Callback()
    with pytest.raises(RuntimeError, match="must run inside transformers.Trainer"):
        callback.on_train_begin(TrainingArguments(output_dir="unused", use_cpu=True), TrainerState(),
                                TrainerControl(), optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]))


def test_resuming_a_stock_checkpoint_with_r8_added_saves_the_next_checkpoint(model, lm_dataset, tmp_path):
    # transformers' own EarlyStoppingCallback fails the same way (KeyError at the next save): R8 works around it.
    train(model, lm_dataset, tmp_path, [], max_steps=10, save_strategy="steps", save_steps=10)
    r8 = R8Callback()
    resumed = Trainer(model=model, args=training_args(tmp_path, max_steps=20, save_strategy="steps", save_steps=5),
                      train_dataset=lm_dataset, callbacks=[r8])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    saved = json.loads((tmp_path / "checkpoint-20" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["R8Callback"]["attributes"]["r8_state"]["engine"]["controller"] is not None
    assert resumed.state.global_step == 20 and r8.controller.step == 19  # it sees a step's signals at the next


def test_a_checkpoint_restores_its_state_only_into_the_callback_of_the_same_state_key(model, lm_dataset, tmp_path,
                                                                                     caplog):
    common = dict(max_steps=16, save_strategy="steps", save_steps=8)
    train(model, lm_dataset, tmp_path / "a", [R8Callback("aggressive", name="pretrain")], **common)
    saved = json.loads((tmp_path / "a" / "checkpoint-8" / "trainer_state.json").read_text())
    entry = saved["stateful_callbacks"]["R8Callback"]
    assert entry["args"]["name"] == "pretrain"
    assert entry["attributes"]["r8_state"]["state_key"] == "R8Callback[pretrain]"

    for name, restored in (("finetune", False), ("pretrain", True)):
        caplog.clear()
        r8 = R8Callback("aggressive", name=name)
        resumed = Trainer(model=model, args=training_args(tmp_path / name, **common), train_dataset=lm_dataset,
                          callbacks=[r8])
        with caplog.at_level("WARNING"):
            resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
        # Restored: the 8 losses before the checkpoint (the 8th saved as pending) and the 7 seen since; else 7.
        assert r8.controller.loss.ema.count == (15 if restored else 7)
        assert ("holds the state of R8Callback[pretrain]" in caplog.text) is not restored
    with pytest.raises(ValueError, match="name='': must be a non-empty string"):
        R8Callback(name="")


def test_a_state_saved_before_keys_and_events_resumes_and_a_newer_version_is_refused(model, lm_dataset, tmp_path):
    common = dict(max_steps=16, save_strategy="steps", save_steps=8)
    train(model, lm_dataset, tmp_path / "a", [R8Callback("aggressive")], **common)
    state_file = tmp_path / "a" / "checkpoint-8" / "trainer_state.json"
    saved = json.loads(state_file.read_text())
    attributes = saved["stateful_callbacks"]["R8Callback"]["attributes"]
    r8_state = attributes["r8_state"] = as_saved_by_version_2(attributes["r8_state"])
    del r8_state["state_key"], r8_state["events"]  # as hf_r8 wrote version 2 before it keyed its states
    state_file.write_text(json.dumps(saved))

    r8 = R8Callback("aggressive", name="anything")
    resumed = Trainer(model=model, args=training_args(tmp_path / "b", **common), train_dataset=lm_dataset,
                      callbacks=[r8])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
    assert r8.controller.loss.ema.count == 15  # the checkpoint's 8 losses, then 7

    r8_state["version"] = 4
    state_file.write_text(json.dumps(saved))
    newer = Trainer(model=model, args=training_args(tmp_path / "c", **common), train_dataset=lm_dataset,
                    callbacks=[R8Callback("aggressive")])
    with pytest.raises(ValueError, match=r"R8Callback state is version 4, newer than this hf_r8 reads \(3\)"):
        newer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))


def test_restored_callback_states_keep_the_users_r8callback_live_with_its_config(model, lm_dataset, tmp_path,
                                                                                  caplog):
    common = dict(max_steps=16, save_strategy="steps", save_steps=8, restore_callback_states_from_checkpoint=True)
    train(model, lm_dataset, tmp_path / "a", [R8Callback.from_preset("aggressive")], **common)
    mine = R8Callback.from_preset("conservative")
    resumed = Trainer(model=model, args=training_args(tmp_path / "b", **common), train_dataset=lm_dataset,
                      callbacks=[mine])
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
    running = [callback for callback in resumed.callback_handler.callbacks if isinstance(callback, R8Callback)]
    assert running == [mine]
    assert mine.controller is not None and mine.controller.step == 15
    assert "without saved state" not in caplog.text  # the checkpoint's state was restored into it
    assert mine.config == R8Config.from_preset("conservative")
    assert "R8Callback you passed stays the live one" in caplog.text


def test_two_r8_callbacks_on_one_trainer_are_refused(model, lm_dataset, tmp_path):
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=lm_dataset,
                      callbacks=[R8Callback(), R8Callback.from_preset("aggressive")])
    with pytest.raises(ValueError, match="Trainer has 2 R8 callbacks"):
        trainer.train()


def test_a_run_that_raises_is_closed_and_flushed_even_when_the_caller_goes_on(tokenizer, lm_dataset, tmp_path):
    def fails_at_25(step):
        if step == 25:
            raise RuntimeError("bad batch")
        return healthy(step)

    from hf_r8.demo.offline import tiny_gpt2

    model = ScriptedLossModel(tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64), fails_at_25)
    r8 = R8Callback()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=40), train_dataset=lm_dataset,
                      callbacks=[r8])
    with pytest.raises(RuntimeError, match="bad batch"):  # a notebook cell that raised: the kernel goes on
        trainer.train()
    assert not r8._outputs.live  # no live view redrawing a stale run
    assert not {"training_step", "log", "_get_grad_norm"} & set(trainer.__dict__)
    rows = read_jsonl(tmp_path / RUN_DIR / METRICS_FILE, merge_by_step=True)
    assert [row["step"] for row in rows] == list(range(1, 25))  # every finished step is on disk
    # Nothing R8 registered at exit keeps the failed run's callback (and its model) alive.
    reference = weakref.ref(r8)
    del r8, trainer, model
    gc.collect()
    assert reference() is None
