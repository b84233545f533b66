"""Mixture-of-experts: routers are found, get groups of their own and the MoE profile, training runs."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, TrainerCallback

from hf_r8 import R8Config, R8Trainer
from hf_r8.demo import offline
from hf_r8.demo.offline import tiny_gpt2
from hf_r8.runtime.moe import is_moe_model, is_router_parameter, split_router_groups
from tests.trainer_setup import VOCAB_SIZE, training_args


def tiny_mixtral(output_router_logits: bool = False) -> MixtralForCausalLM:
    return offline.tiny_mixtral(VOCAB_SIZE, output_router_logits=output_router_logits)


def test_routers_are_module_segments_not_substrings():
    patterns = R8Config().moe.router_patterns
    assert is_router_parameter("model.layers.0.mlp.gate.weight", patterns)
    assert is_router_parameter("model.layers.0.mlp.shared_expert_gate.weight", patterns)
    assert not is_router_parameter("model.layers.0.mlp.experts.gate_up_proj", patterns)
    assert not is_router_parameter("model.layers.0.mlp.gate_proj.weight", patterns)


def test_moe_models_are_detected(tokenizer):
    qwen = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                              moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                              num_experts=4, num_experts_per_tok=2))
    assert is_moe_model(tiny_mixtral()) and is_moe_model(qwen)
    assert not is_moe_model(tiny_gpt2(len(tokenizer), n_embd=32, n_layer=1, n_head=2))


def test_split_keeps_group_settings_and_refuses_a_stepped_optimizer():
    model = tiny_mixtral()
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "weight_decay": 0.1}], lr=1e-3)
    assert split_router_groups(optimizer, model, R8Config().moe.router_patterns) == 1
    assert optimizer.param_groups[1]["weight_decay"] == 0.1 and len(optimizer.param_groups[1]["params"]) == 2
    model(input_ids=torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 4, dtype=torch.long)).loss.backward()
    optimizer.step()
    with pytest.raises(ValueError, match="already stepped"):
        split_router_groups(optimizer, model, R8Config().moe.router_patterns)


@pytest.mark.integration
def test_r8trainer_gives_routers_their_own_groups_and_bounds(lm_dataset, tmp_path):
    trainer = R8Trainer(model=tiny_mixtral(), args=training_args(tmp_path, max_steps=30, learning_rate=3e-3,
                                                                 per_device_train_batch_size=8),
                        train_dataset=lm_dataset.select(range(128)), r8=R8Config.from_preset("aggressive"))
    trainer.train()
    controller = trainer.r8_callback.controller
    routers = [spec.is_router for spec in controller.specs]
    assert routers == [False, False, True]  # decay, no-decay, and the routers (decayed weights) apart
    assert [controller.router_profile[i] for i in range(len(routers))] == routers
    for index, is_router in enumerate(routers):
        low, high = controller.gain_bounds[index]
        assert (low, high) == ((0.1, 2.0) if is_router else (0.01, 20.0))
        assert low <= controller.lr_gain(index) <= high
    assert 1.0 < controller.lr_gain(2) < controller.lr_gain(0)  # the routers' LR grew, more gently


class AuxLossesSeen(TrainerCallback):
    """The router aux loss of every training forward, read from the model's own output."""

    def __init__(self, model):
        self.per_step, self.current = [], []
        model.register_forward_hook(lambda module, args, output: self.current.append(float(output.aux_loss.detach()))
                                    if module.training and torch.is_grad_enabled() else None)

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(sum(self.current) / len(self.current))
        self.current = []


@pytest.mark.integration
def test_the_router_aux_loss_reaches_the_controller(lm_dataset, tmp_path):
    model = tiny_mixtral(output_router_logits=True)
    seen = AuxLossesSeen(model)
    config = R8Config.from_preset("moe").to_dict()
    config["moe"]["aux_loss_fast_beta"] = 0.0  # the fast EMA is the last step's aux loss
    trainer = R8Trainer(model=model, args=training_args(tmp_path, max_steps=12, gradient_accumulation_steps=2,
                                                        eval_strategy="steps", eval_steps=6),
                        train_dataset=lm_dataset.select(range(128)), eval_dataset=lm_dataset.select(range(16)),
                        r8=R8Config.from_dict(config), callbacks=[seen])
    trainer.train()
    controller = trainer.r8_callback.controller
    # One value per optimizer step (the mean of its 2 micro-batches; evaluation forwards left out), through the
    # same delayed path as the loss: the controller has seen steps 1-11 when training ends.
    assert controller.aux_slow.count == 11
    assert controller.aux_fast.value == pytest.approx(seen.per_step[10], rel=1e-5)
    assert any("r8/router_aux_loss_ema" in entry for entry in trainer.state.log_history)
