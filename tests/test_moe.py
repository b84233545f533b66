"""Mixture-of-experts: routers are found, get groups of their own and the MoE profile, training runs."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from hf_r8 import R8Config, R8Trainer
from hf_r8.moe import is_moe_model, is_router_parameter, split_router_groups
from hf_r8.offline import tiny_gpt2
from tests.conftest import VOCAB_SIZE, training_args


def tiny_mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                            num_local_experts=4, num_experts_per_tok=2, bos_token_id=0,
                                            eos_token_id=0, pad_token_id=0))


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
