"""The layer wrapper without routing: ``AdapterLayer``'s forward (no, one and several adapters, disabled,
merged), its ``forward_with_base`` dispatch, ``weight``/``bias``, ``ModulesToSave``, ``add_to_weight``
and ``outer_modules``, each against plain PyTorch maths.

The adapters here are small protocol implementations written for the test (an additive linear update
and an output scaling: the two do not commute, so the order of application shows), not peftkit's
methods; one LoRA case checks the fused dispatch computes the two-step result. Tolerances: 1e-6 where
the same float32 operations are compared in another order, 1e-5 against the fused op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.layer import Adapter, AdapterLayer, ModulesToSave, add_to_weight, outer_modules
from peftkit.methods.lora.adapters import LoraLinear

TOL = {"atol": 1e-6, "rtol": 1e-6}


class AddLinear(nn.Module):
    """``y + U x``; merges as ``W += U``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.update = nn.Parameter(torch.randn(out_features, in_features) * 0.1)

    def forward(self, base: nn.Module, x: Tensor, base_output: Tensor) -> Tensor:
        return base_output + F.linear(x, self.update)

    def merge(self, base: nn.Module, safe: bool = False) -> None:
        add_to_weight(base.weight, self.update, safe)

    def unmerge(self, base: nn.Module) -> None:
        add_to_weight(base.weight, -self.update)


class Scale(nn.Module):
    """``s · y``; merges as ``W, b ← s·W, s·b``."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, base: nn.Module, x: Tensor, base_output: Tensor) -> Tensor:
        return base_output * self.factor

    def merge(self, base: nn.Module, safe: bool = False) -> None:
        with torch.no_grad():
            base.weight.mul_(self.factor)
            base.bias.mul_(self.factor)

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            base.weight.div_(self.factor)
            base.bias.div_(self.factor)


class WithBase(AddLinear):
    """An ``AddLinear`` that offers ``forward_with_base`` and records its calls; ``answer`` None declines."""

    def __init__(self, in_features: int, out_features: int, answer: Tensor | None) -> None:
        super().__init__(in_features, out_features)
        self.answer = answer
        self.calls = 0

    def forward_with_base(self, base: nn.Module, x: Tensor) -> Tensor | None:
        self.calls += 1
        return self.answer


def layer_with(**adapters: nn.Module) -> tuple[AdapterLayer, Tensor, Tensor, Tensor]:
    """An ``AdapterLayer`` over a seeded ``nn.Linear(6, 4)`` holding ``adapters``, none active yet; with
    copies of the base weight and bias and an input x of shape (3, 6)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = AdapterLayer(base)
    for name, adapter in adapters.items():
        layer.adapters[name] = adapter
    return layer, base.weight.detach().clone(), base.bias.detach().clone(), torch.randn(3, 6)


def test_the_test_adapters_follow_the_protocol() -> None:
    assert isinstance(AddLinear(2, 2), Adapter) and isinstance(Scale(2.0), Adapter)


def test_no_adapters_is_the_base_module() -> None:
    layer, W, b, x = layer_with()
    assert torch.equal(layer(x), F.linear(x, W, b))
    layer.active_adapters = ["elsewhere"]  # an active adapter this layer does not have changes nothing
    assert torch.equal(layer(x), F.linear(x, W, b))


def test_one_adapter_adds_its_update() -> None:
    layer, W, b, x = layer_with(add=AddLinear(6, 4))
    layer.active_adapters = ["add"]
    U = layer.adapters["add"].update.detach()
    torch.testing.assert_close(layer(x), x @ W.T + b + x @ U.T, **TOL)


def test_inactive_adapters_do_nothing() -> None:
    layer, W, b, x = layer_with(add=AddLinear(6, 4), scale=Scale(3.0))
    layer.active_adapters = ["scale"]
    torch.testing.assert_close(layer(x), 3.0 * (x @ W.T + b), **TOL)


@pytest.mark.parametrize("order", [["add", "scale"], ["scale", "add"]])
def test_several_adapters_apply_in_the_active_order(order: list[str]) -> None:
    layer, W, b, x = layer_with(add=AddLinear(6, 4), scale=Scale(3.0))
    layer.active_adapters = order
    U = layer.adapters["add"].update.detach()
    y = x @ W.T + b
    expected = 3.0 * (y + x @ U.T) if order[0] == "add" else 3.0 * y + x @ U.T
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_disabled_is_exactly_the_base_module() -> None:
    layer, W, b, x = layer_with(add=AddLinear(6, 4), scale=Scale(3.0))
    layer.active_adapters = ["add", "scale"]
    layer.disabled = True
    assert torch.equal(layer(x), F.linear(x, W, b))


def test_a_merged_adapter_acts_through_the_weight_before_the_unmerged_ones() -> None:
    layer, W, b, x = layer_with(add=AddLinear(6, 4), scale=Scale(3.0))
    layer.active_adapters = ["add", "scale"]
    U = layer.adapters["add"].update.detach()
    layer.merge(["scale"])
    assert layer.merged_adapters == ["scale"]
    torch.testing.assert_close(layer.base.weight, 3.0 * W, **TOL)
    # merged first, whatever the active order: the update is no longer scaled
    torch.testing.assert_close(layer(x), 3.0 * (x @ W.T + b) + x @ U.T, **TOL)
    layer.merge(["add"])
    assert layer.merged_adapters == ["scale", "add"]
    torch.testing.assert_close(layer.base.weight, 3.0 * W + U, **TOL)
    torch.testing.assert_close(layer(x), x @ (3.0 * W + U).T + 3.0 * b, **TOL)  # no adapter left to run


def test_merge_skips_adapters_the_layer_lacks_or_has_merged() -> None:
    layer, W, _, _ = layer_with(add=AddLinear(6, 4))
    layer.merge(["add", "elsewhere", "add"])
    assert layer.merged_adapters == ["add"]
    torch.testing.assert_close(layer.base.weight, W + layer.adapters["add"].update.detach(), **TOL)


def test_unmerge_goes_last_merged_first_down_to_keep() -> None:
    layer, W, b, _ = layer_with(add=AddLinear(6, 4), scale=Scale(3.0))
    U = layer.adapters["add"].update.detach()
    layer.merge(["add", "scale"])  # W' = 3(W + U): only undone exactly in reverse order
    torch.testing.assert_close(layer.base.weight, 3.0 * (W + U), **TOL)
    layer.unmerge(keep=1)
    assert layer.merged_adapters == ["add"]
    torch.testing.assert_close(layer.base.weight, W + U, **TOL)
    torch.testing.assert_close(layer.base.bias, b, **TOL)
    layer.unmerge()
    assert layer.merged_adapters == []
    torch.testing.assert_close(layer.base.weight, W, **TOL)


def test_forward_with_base_answers_for_the_one_adapter_in_use() -> None:
    answer = torch.full((3, 4), 7.0)
    layer, _, _, x = layer_with(fused=WithBase(6, 4, answer))
    layer.active_adapters = ["fused"]
    assert layer(x) is answer
    assert layer.adapters["fused"].calls == 1


def test_forward_with_base_declining_falls_back_to_base_then_adapter() -> None:
    layer, W, b, x = layer_with(fused=WithBase(6, 4, answer=None))
    layer.active_adapters = ["fused"]
    U = layer.adapters["fused"].update.detach()
    torch.testing.assert_close(layer(x), x @ W.T + b + x @ U.T, **TOL)
    assert layer.adapters["fused"].calls == 1


@pytest.mark.parametrize("case", ["two adapters", "disabled", "extra argument", "merged", "inactive"])
def test_forward_with_base_is_not_asked(case: str) -> None:
    answer = torch.full((3, 4), 7.0)
    layer, _, _, x = layer_with(fused=WithBase(6, 4, answer), add=AddLinear(6, 4))
    layer.active_adapters = ["fused", "add"] if case == "two adapters" else ["fused"]
    layer.disabled = case == "disabled"
    if case == "merged":
        layer.merge(["fused"])
    if case == "inactive":
        layer.active_adapters = ["add"]
    if case == "extra argument":  # a base taking more than x: the arguments go to it, the op cannot
        layer.base = _TakesScale(layer.base)
        assert layer(x, 2.0).shape == (3, 4)
    else:
        assert layer(x).shape == (3, 4)
    assert layer.adapters["fused"].calls == 0


class _TakesScale(nn.Module):
    """A base module with an extra positional argument."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.weight = inner.weight

    def forward(self, x: Tensor, factor: float) -> Tensor:
        return self.inner(x) * factor


def test_lora_through_forward_with_base_matches_plain_maths() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 4).requires_grad_(False)
    lora = LoraLinear(base, r=2, scaling=1.5)
    nn.init.normal_(lora.lora_B.weight)  # B starts at zero: make the update visible
    layer = AdapterLayer(base)
    layer.adapters["lora"] = lora
    layer.active_adapters = ["lora"]
    x = torch.randn(3, 5, 6)
    A, B = lora.lora_A.weight.detach(), lora.lora_B.weight.detach()
    expected = F.linear(x, base.weight, base.bias) + 1.5 * (x @ A.T @ B.T)
    assert lora.forward_with_base(base, x) is not None  # the fused path is the one taken here
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_weight_and_bias_are_the_base_modules() -> None:
    layer, _, _, _ = layer_with()
    assert layer.weight is layer.base.weight and layer.bias is layer.base.bias
    assert AdapterLayer(nn.Linear(2, 2, bias=False)).bias is None
    assert AdapterLayer(nn.Embedding(5, 2)).bias is None  # a module with no bias attribute at all


def test_modules_to_save_runs_the_first_active_copy() -> None:
    torch.manual_seed(0)
    original = nn.Linear(3, 2)
    wrapper = ModulesToSave(original)
    wrapper.copies["a"], wrapper.copies["b"] = nn.Linear(3, 2), nn.Linear(3, 2)
    x = torch.randn(4, 3)
    assert wrapper.module_in_use() is original and torch.equal(wrapper(x), original(x))
    wrapper.active_adapters = ["elsewhere", "b", "a"]
    copy_b = wrapper.copies["b"]
    assert wrapper.module_in_use() is copy_b and wrapper.weight is copy_b.weight
    assert torch.equal(wrapper(x), F.linear(x, copy_b.weight, copy_b.bias))
    wrapper.disabled = True
    assert torch.equal(wrapper(x), F.linear(x, original.weight, original.bias))


def test_add_to_weight_adds_in_float32_and_rounds_once() -> None:
    # 1 + 2⁻⁸ + 2⁻¹⁶ rounds up to 1 + 2⁻⁷ in bfloat16; the delta rounded to bfloat16 first (2⁻⁸: a tie,
    # to even) and added there would give 1.0
    weight = nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    storage = weight.data_ptr()
    delta = torch.full((2,), 2.0**-8 + 2.0**-16)
    assert torch.equal(weight.detach() + delta.to(torch.bfloat16), torch.ones(2, dtype=torch.bfloat16))
    add_to_weight(weight, delta)
    assert weight.dtype == torch.bfloat16 and weight.data_ptr() == storage and weight.requires_grad
    assert torch.equal(weight.detach(), torch.full((2,), 1 + 2.0**-7, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    ("dtype", "value", "delta"),
    [
        (torch.float32, 1.0, float("nan")),
        (torch.float32, 1.0, float("inf")),
        (torch.float16, 60000.0, 10000.0),  # finite in float32, inf once written as float16
    ],
)
def test_safe_add_refuses_a_non_finite_result_and_leaves_the_weight(dtype, value, delta) -> None:
    weight = torch.full((3,), value, dtype=dtype)
    with pytest.raises(ValueError, match="NaN or inf"):
        add_to_weight(weight, torch.tensor([0.0, delta, 0.0]), safe=True)
    assert torch.equal(weight, torch.full((3,), value, dtype=dtype))
    add_to_weight(weight, torch.tensor([0.0, delta, 0.0]))  # unsafe: written as it comes
    assert not torch.isfinite(weight[1]) and weight[0] == value


def test_outer_modules_reports_wrappers_but_not_their_insides() -> None:
    shared = nn.Linear(2, 2)
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), shared), shared)
    layer = AdapterLayer(model[0])
    layer.adapters["add"] = AddLinear(2, 2)
    model[0] = layer
    model[1][0] = ModulesToSave(model[1][0])
    names = [name for name, _ in outer_modules(model)]
    assert names == ["", "0", "1", "1.0", "1.1"]  # named_modules' order; the shared module once
    every = [name for name, _ in model.named_modules()]
    assert "0.base" in every and "0.adapters.add" in every and "1.0.original" in every
    assert [module for _, module in outer_modules(model)][1] is layer
