"""IA³: maths against plain PyTorch written out here, Hugging Face PEFT as an oracle, a training run.

Tolerance: fp32, atol 1e-5 (different summation orders of the same products).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import peftkit
from peftkit.methods.ia3 import IA3Linear

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


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_output_and_input_scaling_match_plain_maths(kind: str) -> None:
    torch.manual_seed(0)
    make = (lambda i, o: nn.Linear(i, o)) if kind == "linear" else (lambda i, o: conv1d(o, i))
    base = seq(k_proj=make(12, 6), down_proj=make(6, 12))
    W1, b1 = base.k_proj.weight.detach().clone(), base.k_proj.bias.detach().clone()
    W2, b2 = base.down_proj.weight.detach().clone(), base.down_proj.bias.detach().clone()
    if kind == "conv1d":  # written out as (out, in)
        W1, W2 = W1.T, W2.T
    config = peftkit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = peftkit.wrap(base, config)
    l_out = model.model.k_proj.adapters["default"].ia3_l
    l_in = model.model.down_proj.adapters["default"].ia3_l
    assert l_out.shape == (6, 1) and l_in.shape == (1, 6)
    assert torch.equal(l_out, torch.ones(6, 1)) and torch.equal(l_in, torch.ones(1, 6))
    with torch.no_grad():
        l_out.copy_(torch.randn(6, 1))
        l_in.copy_(torch.randn(1, 6))
    x = torch.randn(2, 5, 12)
    hidden = (x @ W1.T + b1) * l_out.detach().flatten()  # output scaling: l ⊙ (W x + b)
    expected = (hidden * l_in.detach().flatten()) @ W2.T + b2  # input scaling: W (l ⊙ x) + b
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)

    model.merge_adapter()
    merged_k, merged_down = model.model.k_proj.base, model.model.down_proj.base
    W1_merged = merged_k.weight.detach() if kind == "linear" else merged_k.weight.detach().T
    W2_merged = merged_down.weight.detach() if kind == "linear" else merged_down.weight.detach().T
    torch.testing.assert_close(W1_merged, W1 * l_out.detach(), atol=ATOL, rtol=0)  # rows scaled
    torch.testing.assert_close(merged_k.bias.detach(), b1 * l_out.detach().flatten(), atol=ATOL, rtol=0)
    torch.testing.assert_close(W2_merged, W2 * l_in.detach(), atol=ATOL, rtol=0)  # columns scaled
    torch.testing.assert_close(merged_down.bias.detach(), b2, atol=0, rtol=0)  # input scaling: bias kept
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)


def test_parameter_names_and_count() -> None:
    model = peftkit.wrap(
        seq(k_proj=nn.Linear(8, 4), down_proj=nn.Linear(4, 8)),
        peftkit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    assert set(model.adapter_state_dict("default")) == {
        "base_model.model.k_proj.ia3_l",
        "base_model.model.down_proj.ia3_l",
    }
    assert model.trainable_parameters()[0] == 4 + 4  # out of k_proj, in of down_proj


def test_init_false_is_random() -> None:
    config = peftkit.IA3Config(target_modules=["x"], init_ia3_weights=False)
    adapter = config.build_adapter("x", nn.Linear(8, 4))
    assert isinstance(adapter, IA3Linear) and not torch.equal(adapter.ia3_l, torch.ones(4, 1))


def test_feedforward_modules_must_be_targeted() -> None:
    with pytest.raises(ValueError, match=r"feedforward_modules=\['wo'\].*add them to target_modules"):
        peftkit.IA3Config(target_modules=["k", "v"], feedforward_modules=["wo"])
    with pytest.raises(ValueError, match=r"\['down_prj'\].*does not select \(did you mean 'down_proj'\?\)"):
        peftkit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_prj"])


def test_only_linear_and_conv1d_are_supported() -> None:
    config = peftkit.IA3Config(target_modules=["x"])
    assert config.is_supported(nn.Linear(2, 2)) and config.is_supported(conv1d(2, 2))
    assert not config.is_supported(nn.Embedding(4, 2)) and not config.is_supported(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="matched no module"):
        peftkit.wrap(seq(emb=nn.Embedding(4, 2)), peftkit.IA3Config(target_modules=["emb"]))


def test_merge_refuses_a_zero_scale_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = peftkit.wrap(
        seq(a=nn.Linear(4, 4), b=nn.Linear(4, 4)), peftkit.IA3Config(target_modules=["a", "b"])
    )
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    with torch.no_grad():
        model.model.b.adapters["default"].ia3_l[2, 0] = 0.0
    with pytest.raises(ValueError, match="ia3_l has zero entries"):
        model.merge_adapter()
    assert model.merged_adapters == []
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=0, msg=name)


def test_training_lowers_the_loss() -> None:
    config = peftkit.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    )
    model = peftkit.wrap(toy_causal_lm(), config)
    losses = train_toy_task(model, steps=40, lr=5e-2)
    assert losses[-1] < 0.85 * losses[0], losses  # measured: 4.15 → 3.28


# ----------------------------------------------------------------------------- Hugging Face PEFT oracle
peft = pytest.importorskip("peft")

ORACLE = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "t5": (["k", "v", "wo"], ["wo"]),
}
MIN_EFFECT = 1e-3  # the adapter must move the logits this much, or the comparison proves nothing


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # HF PEFT warns about Conv1D fan_in_fan_out, on purpose here
        warnings.simplefilter("ignore")
        yield


def fields(model_name: str) -> dict:
    targets, feedforward = ORACLE[model_name]
    return {"target_modules": targets, "feedforward_modules": feedforward}


@pytest.mark.parametrize("model_name", list(ORACLE))
def test_hf_peft_loads_peftkit_file(model_name: str, tmp_path: Path) -> None:
    tiny = MODELS[model_name]
    base = tiny.make()
    base_logits = logits(twin(base), tiny)
    ours = peftkit.wrap(twin(base), peftkit.IA3Config(**fields(model_name)))
    perturb_trainable(ours, seed=1)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(twin(base), tmp_path)

    expected = logits(ours, tiny)
    assert (expected - base_logits).abs().max() > MIN_EFFECT
    torch.testing.assert_close(logits(theirs, tiny), expected, atol=ATOL, rtol=0)
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, peft.IA3Config)
    assert set(loaded.target_modules) == set(ORACLE[model_name][0])
    assert set(loaded.feedforward_modules) == set(ORACLE[model_name][1])
    text = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(text) <= set(peft.IA3Config().to_dict()) | {"peft_version"}, "fields HF PEFT does not know"


@pytest.mark.parametrize("model_name", list(ORACLE))
def test_peftkit_loads_hf_peft_file(model_name: str, tmp_path: Path) -> None:
    tiny = MODELS[model_name]
    base = tiny.make()
    base_logits = logits(twin(base), tiny)
    theirs = peft.get_peft_model(twin(base), peft.IA3Config(**fields(model_name)))
    perturb_trainable(theirs, seed=2)
    theirs.save_pretrained(tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "unknown adapter config fields"
        ours = peftkit.load(twin(base), tmp_path)

    expected = logits(theirs, tiny)
    assert (expected - base_logits).abs().max() > MIN_EFFECT
    torch.testing.assert_close(logits(ours, tiny), expected, atol=ATOL, rtol=0)
    assert isinstance(ours.peft_config["default"], peftkit.IA3Config)


@pytest.mark.parametrize("model_name", list(ORACLE))
def test_files_have_same_keys_and_shapes(model_name: str, tmp_path: Path) -> None:
    tiny = MODELS[model_name]
    base = tiny.make()
    peftkit.wrap(twin(base), peftkit.IA3Config(**fields(model_name))).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(twin(base), peft.IA3Config(**fields(model_name))).save_pretrained(tmp_path / "hf")
    shapes = {}
    for name in ("ours", "hf"):
        with safe_open(str(tmp_path / name / "adapter_model.safetensors"), framework="pt") as handle:
            shapes[name] = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    assert shapes["ours"] == shapes["hf"]
    assert any(shape[0] == 1 for shape in shapes["ours"].values()), "no feed-forward (1, in) vector"


def test_two_feedforward_scalings_on_one_layer_cannot_be_active_together() -> None:
    """Unmerged they would add ((l1 + l2 - 1) x) where merging multiplies (l1 l2 x): refused instead."""
    from collections import OrderedDict

    config = peftkit.IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"])
    model = peftkit.wrap(nn.Sequential(OrderedDict(down_proj=nn.Linear(6, 4))), config)
    model.add_adapter("b", config)
    with pytest.raises(ValueError, match=r"both scale the input of down_proj"):
        model.set_adapter(["default", "b"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    x = torch.randn(3, 6, generator=generator)
    l1 = model.model.down_proj.adapters["default"].ia3_l.detach()
    l2 = model.model.down_proj.adapters["b"].ia3_l.detach()
    expected = model.model.down_proj.base(x * l1 * l2)
    model.merge_adapter(["default", "b"])
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
