"""Merging adapters into the base weights and back, merge_and_unload and unload.

References and tolerances: see helpers/model_cases.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.core.layer import AdapterLayer, ModulesToSave

from helpers.model_cases import ATOL, grid, wrapped
from helpers.tiny_models import TINY_MODELS, TinyModel, output_of, randomize_adapters


@grid
def test_merge_matches_unmerged_and_unmerge_restores(case: tuple[TinyModel, str]) -> None:
    tiny, name = case
    _, model = wrapped(tiny, name)
    inputs = tiny.inputs()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    unmerged = output_of(model, inputs)
    model.merge_adapter()
    assert model.merged_adapters == ["default"]
    changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert changed, "merging changed no base weight"
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    assert model.merged_adapters == []
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=ATOL, rtol=0)


@grid
def test_merge_and_unload_returns_plain_model(case: tuple[TinyModel, str]) -> None:
    tiny, name = case
    _, model = wrapped(tiny, name)
    inputs = tiny.inputs()
    expected = output_of(model, inputs)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in plain.modules())
    assert not any(".adapters." in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(output_of(plain, inputs), expected, atol=ATOL, rtol=0)


@grid
def test_unload_gives_the_base_back(case: tuple[TinyModel, str]) -> None:
    tiny, name = case
    reference, model = wrapped(tiny, name)
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in plain.modules())
    inputs = tiny.inputs()
    torch.testing.assert_close(output_of(plain, inputs), output_of(reference, inputs), atol=ATOL, rtol=0)


def test_merge_in_bf16_goes_through_fp32() -> None:
    linear = nn.Sequential()
    linear.add_module("proj", nn.Linear(16, 8))
    linear = linear.to(torch.bfloat16)
    weight = linear.proj.weight.detach().float().clone()
    model = peftkit.wrap(linear, peftkit.LoraConfig(r=2, target_modules=["proj"]))
    randomize_adapters(model)
    adapter = model.model.proj.adapters["default"]
    delta = (adapter.lora_B.weight.float() @ adapter.lora_A.weight.float()) * adapter.scaling
    model.merge_adapter()
    expected = (weight + delta).to(torch.bfloat16)
    assert torch.equal(model.model.proj.base.weight, expected)


def test_safe_merge_refuses_non_finite_and_leaves_weights() -> None:
    tiny = TINY_MODELS[1]
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.model.model.layers[1].self_attn.v_proj.adapters["default"].lora_B.weight[0, 0] = float("nan")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    assert model.merged_adapters == []
    for n, p in model.named_parameters():
        if n in weights:  # restored by unmerging: equal up to float rounding
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0, msg=f"{n} was left changed")
