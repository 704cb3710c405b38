"""DoRA: maths against plain PyTorch written out here, Hugging Face PEFT as an oracle, a training run.

Tolerance: fp32, atol 1e-5 (different summation orders of the same products).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

import peftkit
from peftkit.methods.lora.dora import DoraLinear

from helpers.layer_methods import logits, perturb_trainable, toy_causal_lm, train_toy_task
from helpers.tiny_models import TINY_MODELS, twin

ATOL = 1e-5
MODELS = {tiny.name: tiny for tiny in TINY_MODELS}


def seq(**modules: nn.Module) -> nn.Sequential:
    model = nn.Sequential()
    for name, module in modules.items():
        model.add_module(name, module)
    return model


def conv1d(nf: int, nx: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)  # weight (nx, nf) = (in, out)


def dora_model(kind: str, dropout: float = 0.0) -> tuple[peftkit.PeftModel, Tensor, Tensor]:
    """A one-layer DoRA model with random factors and magnitude; (model, W as (out, in), bias)."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 6) if kind == "linear" else conv1d(6, 12)
    weight = layer.weight.detach().clone()
    weight = weight if kind == "linear" else weight.T
    bias = layer.bias.detach().clone()
    config = peftkit.LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout, use_dora=True, target_modules=["p"])
    model = peftkit.wrap(seq(p=layer), config)
    with torch.no_grad():
        adapter = model.model.p.adapters["default"]
        adapter.lora_B.weight.copy_(torch.randn(6, 3) * 0.3)
        adapter.lora_magnitude_vector.mul_(1 + 0.5 * torch.rand(6))
    return model, weight, bias


def plain_dora(x: Tensor, W: Tensor, b: Tensor, A: Tensor, B: Tensor, m: Tensor, s: float, detach: bool):
    """y = m · (W + s·B·A) / ||W + s·B·A||_row · x + b, the row norm detached or not."""
    adapted = W + s * B @ A  # (out, in)
    norm = adapted.norm(dim=1, keepdim=True)  # (out, 1)
    norm = norm.detach() if detach else norm
    return x @ (m.unsqueeze(1) * adapted / norm).T + b


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_merge_match_plain_maths(kind: str) -> None:
    model, W, b = dora_model(kind)
    adapter = model.model.p.adapters["default"]
    A, B = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
    m = adapter.lora_magnitude_vector.detach()
    x = torch.randn(2, 5, 12)
    expected = plain_dora(x, W, b, A, B, m, 2.0, detach=True)
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)

    model.merge_adapter()
    merged = model.model.p.base.weight.detach()
    merged = merged if kind == "linear" else merged.T
    adapted = W + 2.0 * B @ A
    torch.testing.assert_close(
        merged, m.unsqueeze(1) * adapted / adapted.norm(dim=1, keepdim=True), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    restored = model.model.p.base.weight.detach()
    torch.testing.assert_close(restored if kind == "linear" else restored.T, W, atol=ATOL, rtol=0)


def test_magnitude_starts_at_the_weight_norm_and_names_match_hf() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    model = peftkit.wrap(seq(p=layer), peftkit.LoraConfig(r=2, use_dora=True, target_modules=["p"]))
    adapter = model.model.p.adapters["default"]
    assert isinstance(adapter, DoraLinear)
    torch.testing.assert_close(adapter.lora_magnitude_vector.detach(), layer.weight.detach().norm(dim=1))
    assert set(model.adapter_state_dict("default")) == {
        "base_model.model.p.lora_A.weight",
        "base_model.model.p.lora_B.weight",
        "base_model.model.p.lora_magnitude_vector",
    }


def test_gradients_treat_the_norm_as_a_constant() -> None:
    """Gradients equal the plain formula's with the norm detached, and differ from the undetached one's."""
    model, W, b = dora_model("linear")
    adapter = model.model.p.adapters["default"]
    x = torch.randn(4, 12)
    target = torch.randn(4, 6)
    ((model(x) - target) ** 2).sum().backward()
    ours = [adapter.lora_A.weight.grad, adapter.lora_B.weight.grad, adapter.lora_magnitude_vector.grad]
    for detach, should_match in ((True, True), (False, False)):
        A = adapter.lora_A.weight.detach().clone().requires_grad_()
        B = adapter.lora_B.weight.detach().clone().requires_grad_()
        m = adapter.lora_magnitude_vector.detach().clone().requires_grad_()
        ((plain_dora(x, W, b, A, B, m, 2.0, detach) - target) ** 2).sum().backward()
        same = all(torch.allclose(g, r.grad, atol=1e-5) for g, r in zip(ours, (A, B, m), strict=True))
        assert same == should_match, f"detach={detach}"


def test_dropout_in_training_sees_the_same_dropped_input() -> None:
    model, W, b = dora_model("linear", dropout=0.5)
    adapter = model.model.p.adapters["default"]
    A, B = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
    m = adapter.lora_magnitude_vector.detach()
    model.train()
    x = torch.randn(4, 12)
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)  # the same mask: one dropout call on the same shape
    factor = m / (W + 2.0 * B @ A).norm(dim=1)
    expected = x @ W.T + b + (factor - 1) * (dropped @ W.T) + factor * (2.0 * dropped @ A.T @ B.T)
    torch.testing.assert_close(out.detach(), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("module", [nn.Embedding(10, 4), nn.Conv2d(4, 4, 1)], ids=["embedding", "conv2d"])
def test_unsupported_layers_are_refused_clearly(module: nn.Module) -> None:
    with pytest.raises(ValueError, match=rf"use_dora=True supports nn.Linear .* not {type(module).__name__}"):
        peftkit.wrap(seq(p=module), peftkit.LoraConfig(r=2, use_dora=True, target_modules=["p"]))


def test_training_lowers_the_loss() -> None:
    config = peftkit.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    model = peftkit.wrap(toy_causal_lm(), config)
    losses = train_toy_task(model, steps=40, lr=1e-2)
    assert losses[-1] < 0.85 * losses[0], losses


# ----------------------------------------------------------------------------- Hugging Face PEFT oracle
peft = pytest.importorskip("peft")

ORACLE = {
    "llama": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "gpt2": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"]},
    "bert": {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["query", "value"]},
}
MIN_EFFECT = 1e-3  # the adapter must move the logits this much, or the comparison proves nothing


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # HF PEFT warns about Conv1D fan_in_fan_out, on purpose here
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("model_name", list(ORACLE))
def test_hf_peft_loads_peftkit_file(model_name: str, tmp_path: Path) -> None:
    tiny = MODELS[model_name]
    base = tiny.make()
    base_logits = logits(twin(base), tiny)
    ours = peftkit.wrap(twin(base), peftkit.LoraConfig(use_dora=True, **ORACLE[model_name]))
    perturb_trainable(ours, seed=1)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(twin(base), tmp_path)

    assert theirs.peft_config["default"].use_dora is True
    expected = logits(ours, tiny)
    assert (expected - base_logits).abs().max() > MIN_EFFECT
    torch.testing.assert_close(logits(theirs, tiny), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_name", list(ORACLE))
def test_peftkit_loads_hf_peft_file(model_name: str, tmp_path: Path) -> None:
    tiny = MODELS[model_name]
    base = tiny.make()
    base_logits = logits(twin(base), tiny)
    theirs = peft.get_peft_model(twin(base), peft.LoraConfig(use_dora=True, **ORACLE[model_name]))
    perturb_trainable(theirs, seed=2)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.load(twin(base), tmp_path)

    assert ours.peft_config["default"].use_dora is True
    expected = logits(theirs, tiny)
    assert (expected - base_logits).abs().max() > MIN_EFFECT
    torch.testing.assert_close(logits(ours, tiny), expected, atol=ATOL, rtol=0)
    # merged, both libraries fold the same weights in
    ours.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(logits(ours, tiny), logits(theirs, tiny), atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_name", list(ORACLE))
def test_files_have_same_keys_and_shapes(model_name: str, tmp_path: Path) -> None:
    tiny = MODELS[model_name]
    base = tiny.make()
    peftkit.wrap(twin(base), peftkit.LoraConfig(use_dora=True, **ORACLE[model_name])).save_pretrained(
        tmp_path / "ours"
    )
    peft.get_peft_model(twin(base), peft.LoraConfig(use_dora=True, **ORACLE[model_name])).save_pretrained(
        tmp_path / "hf"
    )
    shapes = {}
    for name in ("ours", "hf"):
        with safe_open(str(tmp_path / name / "adapter_model.safetensors"), framework="pt") as handle:
            shapes[name] = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    assert shapes["ours"] == shapes["hf"]
    assert any(key.endswith(".lora_magnitude_vector") for key in shapes["ours"])
