"""Bottleneck adapters: maths against plain PyTorch, default placements per architecture, the
not-mergeable error, the file format, a training run.

Tolerance: fp32, atol 1e-5 (different summation orders of the same products).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import peftkit
from peftkit.methods.bottleneck import BottleneckAdapter

from helpers.layer_methods import logits, perturb_adapters, toy_causal_lm, train_toy_task
from helpers.tiny_models import TINY_MODELS, twin

ATOL = 1e-5
MODELS = {tiny.name: tiny for tiny in TINY_MODELS}


def seq(**modules: nn.Module) -> nn.Sequential:
    model = nn.Sequential()
    for name, module in modules.items():
        model.add_module(name, module)
    return model


@pytest.mark.parametrize(("non_linearity", "act"), [("relu", F.relu), ("gelu", F.gelu), ("tanh", torch.tanh)])
def test_forward_is_output_plus_residual_mlp(non_linearity: str, act) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(10, 16)
    W, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    config = peftkit.BottleneckConfig(bottleneck_size=3, non_linearity=non_linearity, target_modules=["p"])
    model = peftkit.wrap(seq(p=layer), config)
    x = torch.randn(2, 5, 10)
    torch.testing.assert_close(model(x), x @ W.T + b, atol=0, rtol=0)  # up-projection zero: the identity
    perturb_adapters(model, seed=1, scale=0.5)
    adapter = model.model.p.adapters["default"]
    down_W, down_b = adapter.adapter_down.weight.detach(), adapter.adapter_down.bias.detach()  # (3, 16), (3,)
    up_W, up_b = adapter.adapter_up.weight.detach(), adapter.adapter_up.bias.detach()  # (16, 3), (16,)
    y = x @ W.T + b
    torch.testing.assert_close(model(x), y + act(y @ down_W.T + down_b) @ up_W.T + up_b, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "size"), [({}, 1), ({"reduction_factor": 4}, 4), ({"bottleneck_size": 5}, 5)]
)
def test_bottleneck_width(kwargs: dict, size: int) -> None:
    model = peftkit.wrap(seq(p=nn.Linear(4, 16)), peftkit.BottleneckConfig(target_modules=["p"], **kwargs))
    adapter = model.model.p.adapters["default"]
    assert isinstance(adapter, BottleneckAdapter)
    assert adapter.adapter_down.weight.shape == (size, 16) and adapter.adapter_up.weight.shape == (16, size)
    assert model.trainable_parameters()[0] == 16 * size + size + size * 16 + 16


#: (model, preset) → the modules that get an adapter, written out per architecture.
PLACEMENTS = {
    ("llama", "houlsby"): {
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.o_proj", "mlp.down_proj")
    },
    ("llama", "pfeiffer"): {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)},
    ("gpt2", "houlsby"): {f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_proj", "mlp.c_proj")},
    ("gpt2", "pfeiffer"): {f"transformer.h.{i}.mlp.c_proj" for i in (0, 1)},
    ("bert", "houlsby"): {
        f"bert.encoder.layer.{i}.{m}" for i in (0, 1) for m in ("attention.output.dense", "output.dense")
    },
    ("bert", "pfeiffer"): {f"bert.encoder.layer.{i}.output.dense" for i in (0, 1)},
    ("t5", "houlsby"): {
        *(f"encoder.block.{i}.layer.0.SelfAttention.o" for i in (0, 1)),
        *(f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in (0, 1)),
        *(f"decoder.block.{i}.layer.0.SelfAttention.o" for i in (0, 1)),
        *(f"decoder.block.{i}.layer.1.EncDecAttention.o" for i in (0, 1)),
        *(f"decoder.block.{i}.layer.2.DenseReluDense.wo" for i in (0, 1)),
    },
    ("t5", "pfeiffer"): {
        *(f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in (0, 1)),
        *(f"decoder.block.{i}.layer.2.DenseReluDense.wo" for i in (0, 1)),
    },
}
PRESETS = {"houlsby": peftkit.HoulsbyConfig, "pfeiffer": peftkit.PfeifferConfig}


def adapted_modules(model: peftkit.PeftModel) -> set[str]:
    return {
        key.removeprefix("base_model.model.").removesuffix(".adapter_down.weight")
        for key in model.adapter_state_dict("default")
        if key.endswith(".adapter_down.weight")
    }


@pytest.mark.parametrize(("model_name", "preset"), list(PLACEMENTS), ids=[f"{m}-{p}" for m, p in PLACEMENTS])
def test_default_placements_by_architecture(model_name: str, preset: str) -> None:
    model = peftkit.wrap(MODELS[model_name].make(), PRESETS[preset](reduction_factor=4))
    assert adapted_modules(model) == PLACEMENTS[(model_name, preset)]


def test_bert_suffix_list_matches_both_output_denses() -> None:
    """A list entry is a dotted suffix (the LoRA rules): "output.dense" includes attention.output.dense."""
    model = peftkit.wrap(MODELS["bert"].make(), peftkit.BottleneckConfig(target_modules=["output.dense"]))
    assert adapted_modules(model) == PLACEMENTS[("bert", "houlsby")]


def test_other_architectures_need_target_modules() -> None:
    with pytest.raises(ValueError, match=r"matched no module .* candidates: .*lin1 \(Linear x1\)"):
        peftkit.wrap(MODELS["mlp-conv"].make(), peftkit.BottleneckConfig())
    model = peftkit.wrap(MODELS["mlp-conv"].make(), peftkit.BottleneckConfig(target_modules=["lin2"]))
    assert adapted_modules(model) == {"lin2"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bottleneck_size": 4, "reduction_factor": 2}, "give one of them"),
        ({"bottleneck_size": 0}, "bottleneck_size=0 must be a positive integer"),
        ({"non_linearity": "sigmoid"}, "non_linearity='sigmoid' must be one of"),
        ({"after_attention": False, "after_feedforward": False}, "nothing to adapt"),
    ],
)
def test_bad_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        peftkit.BottleneckConfig(**kwargs)


def test_merge_is_refused_clearly_and_nothing_stays_merged() -> None:
    """A LoRA adapter merges first in the same call; the bottleneck's refusal takes it back out."""
    tiny = MODELS["llama"]
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("bottleneck", peftkit.PfeifferConfig(reduction_factor=4))
    perturb_adapters(model, seed=1)
    model.set_adapter(["default", "bottleneck"])
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    expected = logits(model, tiny)
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(
            NotImplementedError, match="bottleneck adapters cannot be merged into the weights"
        ):
            call()
        assert model.merged_adapters == []
        for name, param in model.named_parameters():
            if name in weights:
                torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(logits(model, tiny), expected, atol=ATOL, rtol=0)
    model.merge_adapter(["default"])  # the mergeable one alone still merges
    assert model.merged_adapters == ["default"]


def test_file_format(tmp_path: Path) -> None:
    tiny = MODELS["gpt2"]
    base = tiny.make()
    model = peftkit.wrap(twin(base), peftkit.PfeifferConfig(bottleneck_size=4, non_linearity="gelu"))
    perturb_adapters(model, seed=1)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK"
    assert (config["bottleneck_size"], config["non_linearity"], config["after_attention"]) == (
        4,
        "gelu",
        False,
    )
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    prefix = "base_model.model.transformer.h.0.mlp.c_proj."
    assert {k: v for k, v in shapes.items() if k.startswith(prefix)} == {
        prefix + "adapter_down.weight": (4, 32),
        prefix + "adapter_down.bias": (4,),
        prefix + "adapter_up.weight": (32, 4),
        prefix + "adapter_up.bias": (32,),
    }
    loaded = peftkit.load(twin(base), tmp_path)
    assert loaded.peft_config["default"].after_attention is False
    torch.testing.assert_close(logits(loaded, tiny), logits(model, tiny), atol=0, rtol=0)


def test_training_lowers_the_loss() -> None:
    model = peftkit.wrap(toy_causal_lm(), peftkit.HoulsbyConfig(bottleneck_size=8))
    losses = train_toy_task(model, steps=40, lr=1e-2)
    assert losses[-1] < 0.85 * losses[0], losses
