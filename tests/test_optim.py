"""LoRA+: which parameter lands in which group, and what Adam's first step does with the groups.

Adam's first step moves every parameter with a nonzero gradient by exactly its learning rate (m/√v is
±1 when eps is negligible): an independent check that B really learns ``loraplus_lr_ratio`` times
faster. Tolerance: relative 1e-3 on step sizes (eps = 1e-12).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.optim import lora_plus_optimizer, lora_plus_param_groups


def model_with_everything() -> peftkit.PeftModel:
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("emb", nn.Embedding(10, 8))
    base.add_module("proj", nn.Linear(8, 8))
    base.add_module("head", nn.Linear(8, 3))
    config = peftkit.LoraConfig(
        r=2, target_modules=["emb", "proj"], bias="lora_only", modules_to_save=["head"]
    )
    model = peftkit.wrap(base, config)
    model.add_adapter("dora", peftkit.LoraConfig(r=2, use_dora=True, target_modules=["proj"]))
    model.set_adapter(["default", "dora"])
    return model


def names_by_group(model: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {group["name"]: {names[id(p)] for p in group["params"]} for group in groups}


def test_groups_and_learning_rates() -> None:
    model = model_with_everything()
    groups = lora_plus_param_groups(model, lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5)
    by_name = names_by_group(model, groups)
    assert by_name == {
        "lora_B": {"model.proj.adapters.default.lora_B.weight", "model.proj.adapters.dora.lora_B.weight"},
        "embedding": {
            "model.emb.adapters.default.lora_embedding_A",
            "model.emb.adapters.default.lora_embedding_B",
        },
        "other": {
            "model.proj.adapters.default.lora_A.weight",
            "model.proj.adapters.dora.lora_A.weight",
            "model.head.copies.default.weight",
        },
        "other_no_decay": {
            "model.proj.adapters.dora.lora_magnitude_vector",
            "model.proj.base.bias",
            "model.head.copies.default.bias",
        },
    }
    lrs = {group["name"]: group["lr"] for group in groups}
    assert lrs == {"lora_B": 16e-3, "embedding": 1e-5, "other": 1e-3, "other_no_decay": 1e-3}
    assert [g.get("weight_decay") for g in groups if g["name"].endswith("_no_decay")] == [0.0]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*by_name.values()) == trainable, "every trainable parameter is in exactly one group"
    assert sum(len(g) for g in by_name.values()) == len(trainable)


def test_first_adam_step_moves_b_ratio_times_further_than_a() -> None:
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(8, 8))
    model = peftkit.wrap(base, peftkit.LoraConfig(r=2, init_lora_weights=False, target_modules=["proj"]))
    optimizer = lora_plus_optimizer(
        model, torch.optim.Adam, lr=1e-3, loraplus_lr_ratio=16, eps=1e-12, betas=(0.5, 0.5)
    )
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["betas"] == (0.5, 0.5)
    adapter = model.model.proj.adapters["default"]
    before = {"A": adapter.lora_A.weight.detach().clone(), "B": adapter.lora_B.weight.detach().clone()}
    model(torch.randn(4, 8)).pow(2).sum().backward()
    optimizer.step()
    step_A = (adapter.lora_A.weight.detach() - before["A"]).abs()
    step_B = (adapter.lora_B.weight.detach() - before["B"]).abs()
    torch.testing.assert_close(step_A, torch.full_like(step_A, 1e-3), rtol=1e-3, atol=0)
    torch.testing.assert_close(step_B, torch.full_like(step_B, 16e-3), rtol=1e-3, atol=0)


def test_frozen_adapters_are_left_out() -> None:
    model = model_with_everything()
    model.set_adapter("dora")  # "default" is now frozen
    by_name = names_by_group(model, lora_plus_param_groups(model, lr=1e-3))
    assert all(".default." not in name for names in by_name.values() for name in names)
    assert by_name["lora_B"] == {"model.proj.adapters.dora.lora_B.weight"}


def test_errors_say_what_to_do() -> None:
    model = peftkit.wrap(nn.Sequential(nn.Linear(4, 4)), peftkit.IA3Config(target_modules=["0"]))
    with pytest.raises(ValueError, match="no trainable LoRA B factor"):
        lora_plus_optimizer(model, lr=1e-3)
    with pytest.raises(ValueError, match=r"loraplus_lr_ratio=0\.5 must be at least 1"):
        lora_plus_param_groups(model_with_everything(), lr=1e-3, loraplus_lr_ratio=0.5)


def test_training_with_lora_plus_lowers_the_loss() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        initializer_range=0.1,  # features with some scale, as in a trained model
    )
    lora = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = peftkit.wrap(LlamaForCausalLM(config), lora)
    optimizer = lora_plus_optimizer(model, lr=2e-3)
    ids = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(0))  # memorise 4 sequences
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
