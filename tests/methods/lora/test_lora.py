"""LoRA maths against plain PyTorch written out here, per supported layer type.

Tolerance: fp32, atol 1e-5 (different summation orders of the same products).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.methods.lora import LoraConfig, LoraConv, LoraEmbedding, LoraLinear, lora_scaling

ATOL = 1e-5


def seq(**modules: nn.Module) -> nn.Sequential:
    model = nn.Sequential()
    for name, module in modules.items():
        model.add_module(name, module)
    return model


def random_adapters(model: peftkit.PeftModel, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.mark.parametrize(("alpha", "r", "rslora", "expected"), [(16, 8, False, 2.0), (16, 4, True, 8.0)])
def test_scaling(alpha: float, r: int, rslora: bool, expected: float) -> None:
    assert lora_scaling(alpha, r, rslora) == expected


def test_linear_forward_is_w_x_plus_scaled_b_a_x() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 6)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = peftkit.wrap(seq(proj=layer), LoraConfig(r=3, lora_alpha=6, target_modules=["proj"]))
    random_adapters(model)
    adapter = model.model.proj.adapters["default"]
    A, B = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()  # (3, 12), (6, 3)
    x = torch.randn(2, 5, 12)
    expected = x @ weight.T + bias + (6 / 3) * (x @ A.T @ B.T)
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)


def test_conv1d_transformers_layer_uses_transposed_weight() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(6, 12)  # nf=6 outputs, nx=12 inputs; weight (12, 6)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = peftkit.wrap(seq(c_attn=layer), LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"]))
    random_adapters(model)
    adapter = model.model.c_attn.adapters["default"]
    A, B = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
    assert A.shape == (2, 12) and B.shape == (6, 2)
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), x @ weight + bias + x @ A.T @ B.T, atol=ATOL, rtol=0)
    model.merge_adapter()
    torch.testing.assert_close(model.model.c_attn.base.weight, weight + (B @ A).T, atol=ATOL, rtol=0)


def test_embedding_forward_and_parameter_names() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, padding_idx=0)
    weight = emb.weight.detach().clone()
    model = peftkit.wrap(seq(embed=emb), LoraConfig(r=2, lora_alpha=4, target_modules=["embed"]))
    random_adapters(model)
    keys = set(model.adapter_state_dict("default"))
    assert keys == {"base_model.model.embed.lora_embedding_A", "base_model.model.embed.lora_embedding_B"}
    adapter = model.model.embed.adapters["default"]
    A, B = adapter.lora_embedding_A.detach(), adapter.lora_embedding_B.detach()  # (2, 10), (4, 2)
    ids = torch.tensor([[0, 3, 9], [1, 1, 2]])
    expected = weight[ids] + 2.0 * (A.T[ids] @ B.T)
    torch.testing.assert_close(model(ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("conv_type", [nn.Conv1d, nn.Conv2d])
@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_forward_equals_conv_with_merged_kernel(conv_type: type[nn.Module], kernel: int) -> None:
    """A then a 1x1 B is one convolution with kernel W + s·(B∘A): checked by the independent conv call."""
    torch.manual_seed(0)
    conv = conv_type(4, 6, kernel, padding=kernel // 2, stride=1)
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    model = peftkit.wrap(seq(conv=conv), LoraConfig(r=2, lora_alpha=4, target_modules=["conv"]))
    random_adapters(model)
    adapter = model.model.conv.adapters["default"]
    A, B = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
    x = torch.randn(2, 4, 9) if conv_type is nn.Conv1d else torch.randn(2, 4, 7, 7)
    # B∘A written out as an einsum over the rank: (out, r) x (r, in, *kernel) → (out, in, *kernel)
    composed = torch.einsum("or,ri...->oi...", B.flatten(1), A)
    functional = F.conv1d if conv_type is nn.Conv1d else F.conv2d
    expected = functional(x, weight + 2.0 * composed, bias, padding=kernel // 2)
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(adapter.delta_weight(), 2.0 * composed, atol=ATOL, rtol=0)


def test_grouped_conv_is_refused() -> None:
    model = seq(conv=nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        peftkit.wrap(model, LoraConfig(target_modules=["conv"]))


def test_dropout_applies_to_the_low_rank_path_only() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    model = peftkit.wrap(seq(proj=layer), LoraConfig(r=2, lora_dropout=0.5, target_modules=["proj"]))
    model.train()  # B is zero at init: with dropout on the LoRA input only, the output is the base's
    x = torch.randn(16, 8)
    torch.testing.assert_close(model(x), model.model.proj.base(x), atol=0, rtol=0)
    assert isinstance(model.model.proj.adapters["default"].dropout, nn.Dropout)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_makes_b_zero_and_a_nonzero(init: bool | str) -> None:
    config = LoraConfig(r=4, init_lora_weights=init, target_modules=["proj"])
    model = peftkit.wrap(seq(proj=nn.Linear(32, 16)), config)
    adapter = model.model.proj.adapters["default"]
    assert torch.count_nonzero(adapter.lora_B.weight) == 0
    assert torch.count_nonzero(adapter.lora_A.weight) == adapter.lora_A.weight.numel()
    if init == "gaussian":  # std 1/r
        assert adapter.lora_A.weight.std().item() == pytest.approx(1 / 4, rel=0.3)
    else:  # kaiming-uniform with a=sqrt(5): bound 1/sqrt(in_features)
        assert adapter.lora_A.weight.abs().max().item() <= 1 / math.sqrt(32) + 1e-6


def test_init_false_changes_the_output() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    x = torch.randn(3, 8)
    base_out = layer(x)
    model = peftkit.wrap(seq(proj=layer), LoraConfig(r=2, init_lora_weights=False, target_modules=["proj"]))
    assert not torch.allclose(model(x), base_out, atol=1e-4)


def test_rank_and_alpha_patterns_per_module() -> None:
    model = seq(q_proj=nn.Linear(8, 8), v_proj=nn.Linear(8, 8), o_proj=nn.Linear(8, 8))
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"o_.*": 32},
    )
    wrapped = peftkit.wrap(model, config)
    names = ("q_proj", "v_proj", "o_proj")
    adapters = {name: wrapped.model.get_submodule(name).adapters["default"] for name in names}
    assert adapters["q_proj"].lora_A.out_features == 4 and adapters["q_proj"].scaling == 2.0
    assert adapters["v_proj"].lora_A.out_features == 2 and adapters["v_proj"].scaling == 4.0
    assert adapters["o_proj"].lora_A.out_features == 4 and adapters["o_proj"].scaling == 8.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r=0 must be a positive integer"),
        ({"lora_dropout": 1.0}, "lora_dropout=1.0"),
        ({"bias": "some"}, "bias='some'"),
        ({"init_lora_weights": "kaiming"}, "init_lora_weights=.kaiming. must be"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
        ({"task_type": "CHAT"}, "task_type='CHAT'"),
    ],
)
def test_bad_config_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraConfig(target_modules=["q"], **kwargs)


def test_half_precision_base_gets_float32_adapters() -> None:
    layer = nn.Linear(8, 8).to(torch.bfloat16)
    model = peftkit.wrap(seq(proj=layer), LoraConfig(r=2, target_modules=["proj"]))
    adapter = model.model.proj.adapters["default"]
    assert adapter.lora_A.weight.dtype == torch.float32
    out = model(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_adapter_classes_follow_base_type() -> None:
    from transformers.pytorch_utils import Conv1D

    config = LoraConfig(target_modules=["x"])
    assert isinstance(config.build_adapter("x", nn.Linear(4, 4)), LoraLinear)
    assert isinstance(config.build_adapter("x", Conv1D(4, 4)), LoraLinear)
    assert isinstance(config.build_adapter("x", nn.Embedding(4, 4)), LoraEmbedding)
    assert isinstance(config.build_adapter("x", nn.Conv2d(4, 4, 1)), LoraConv)
    assert not config.is_supported(nn.LayerNorm(4))
