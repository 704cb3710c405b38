"""The fast LoRA linear path against plain PyTorch: outputs and gradients of x, A, B and the base bias.

The reference is written out here (``W x + b + s·B·A·(x ⊙ m / keep)`` through autograd, the keep mask
``m`` built here by indexing from the dropped elements the path drew), independent of the function under
test. Tolerances: float32 atol 1e-5 (the same products summed in another order); bfloat16 inputs atol
2e-2 and rtol 2⁻⁷ (a bf16 rounding more or less: its last place is 2⁻⁸ to 2⁻⁷ of the value); where
A and B are bfloat16 too (the base-inside op takes one dtype), the low-rank products round in bf16 as
well, so the absolute tolerance is 2⁻⁶ of the tensor's largest value (seen: up to 0.6%).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import peftkit
from peftkit.methods.lora import adapters as lora_module
from peftkit.ops import (
    draw_dropout,
    fast_lora,
    fast_lora_enabled,
    frozen_linear_lora,
    lora_linear,
    lora_linear_reference,
    set_fast_lora,
)
from peftkit.ops.dropout import POSITIONS_UP_TO

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
RTOL = {torch.float32: 0.0, torch.bfloat16: 2**-7}
IN, OUT, RANK = 24, 20, 4


def leaves(dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor]:
    """x (2, 5, IN) in ``dtype``; W, b in ``dtype`` with b trainable; A, B float32 (as peftkit makes them)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, dtype: torch.dtype = torch.float32, std: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(dtype).requires_grad_()

    return {  # sizes as in a trained layer: outputs of order 1
        "x": rand(2, 5, IN, dtype=dtype),
        "W": (torch.randn(OUT, IN, generator=generator) / IN**0.5).to(dtype),  # frozen
        "b": rand(OUT, dtype=dtype, std=0.1),
        "A": rand(RANK, IN, std=IN**-0.5),
        "B": rand(OUT, RANK, std=0.3),
    }


def keep_floats(dropped: Tensor | None, like: Tensor) -> Tensor | None:
    """1. where kept, 0. where dropped, shaped like ``like``, from positions or a bool mask."""
    if dropped is None:
        return None
    keep = torch.ones(like.numel())
    keep[dropped.reshape(-1) if dropped.dtype == torch.bool else dropped] = 0
    return keep.view(like.shape)


def plain(t: dict[str, Tensor], scaling: float, dropped: Tensor | None, keep: float) -> Tensor:
    """The expected output, spelled out."""
    mask = keep_floats(dropped, t["x"])
    dropped = t["x"].float() if mask is None else t["x"].float() * mask / keep
    update = scaling * (dropped @ t["A"].float().T @ t["B"].float().T)
    return F.linear(t["x"], t["W"], t["b"]) + update.to(t["x"].dtype)


def outputs_and_grads(fn, t: dict[str, Tensor], scaling: float, mask: Tensor | None, keep: float):
    base_output = F.linear(t["x"], t["W"], t["b"])
    out = fn(t["x"], base_output, t["A"], t["B"], scaling, mask, keep)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    names = ["x", "b", "A", "B"]
    grads = torch.autograd.grad(out, [t[n] for n in names], upstream)
    return out, dict(zip(names, grads, strict=True))


def expected_and_grads(t: dict[str, Tensor], scaling: float, mask: Tensor | None, keep: float):
    out = plain(t, scaling, mask, keep)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    names = ["x", "b", "A", "B"]
    grads = torch.autograd.grad(out, [t[n] for n in names], upstream)
    return out, dict(zip(names, grads, strict=True))


def frozen_linear_lora_as_lora_linear(x, base_output, lora_A, lora_B, scaling, dropped, keep, t=None):
    """:func:`frozen_linear_lora` called with the leaves' W and b (the base output is not used)."""
    return frozen_linear_lora(x, t["W"], t["b"], lora_A, lora_B, scaling, dropped, keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.3], ids=["p0", "positions", "mask"])
@pytest.mark.parametrize(
    "function",
    [lora_linear, frozen_linear_lora_as_lora_linear, lora_linear_reference],
    ids=["fast", "base-inside", "reference-twin"],
)
def test_outputs_and_gradients_equal_plain_pytorch(function, p: float, dtype: torch.dtype) -> None:
    t = leaves(dtype)
    if function is frozen_linear_lora_as_lora_linear:  # one dtype throughout, as LoraLinear requires
        t["A"], t["B"] = (t[n].detach().to(dtype).requires_grad_() for n in ("A", "B"))
        function = partial(function, t=t)
    torch.manual_seed(3)
    mask, keep = draw_dropout(t["x"], p)
    assert (mask is None) == (p == 0) and (p != 0.1 or mask.dtype == torch.int64)
    out, grads = outputs_and_grads(function, t, 2.5, mask, keep)
    expected, expected_grads = expected_and_grads(t, 2.5, mask, keep)
    assert out.dtype == dtype
    for name, value, reference in [("output", out, expected)] + [
        (f"grad of {name}", grad, expected_grads[name]) for name, grad in grads.items()
    ]:
        atol = ATOL[dtype]
        if t["A"].dtype == torch.bfloat16:
            atol = max(atol, 2**-6 * reference.abs().max().item())
        torch.testing.assert_close(value, reference, atol=atol, rtol=RTOL[dtype], msg=name)


def test_no_gradient_needed_gives_the_same_output_without_a_graph() -> None:
    t = leaves(torch.float32)
    with torch.no_grad():
        base_output = F.linear(t["x"], t["W"], t["b"])
        out = lora_linear(t["x"], base_output, t["A"], t["B"], 0.5)
        expected = plain(t, 0.5, None, 1.0)
    assert out.grad_fn is None
    torch.testing.assert_close(out, expected, atol=ATOL[torch.float32], rtol=0)


def test_base_inside_refuses_a_trained_weight_and_mixed_dtypes() -> None:
    t = leaves(torch.float32)
    with pytest.raises(ValueError, match="weight requires a gradient"):
        frozen_linear_lora(t["x"], t["W"].clone().requires_grad_(), t["b"], t["A"], t["B"], 1.0)
    with pytest.raises(ValueError, match="share one dtype"):
        frozen_linear_lora(t["x"].bfloat16(), t["W"].bfloat16(), None, t["A"], t["B"], 1.0)


def test_no_gradient_needed_base_inside_gives_the_same_output_without_a_graph() -> None:
    t = leaves(torch.float32)
    with torch.no_grad():
        out = frozen_linear_lora(t["x"], t["W"], t["b"], t["A"], t["B"], 0.5)
        expected = plain(t, 0.5, None, 1.0)
    assert out.grad_fn is None and out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("p", [0.1, 0.3], ids=["positions", "mask"])
def test_saves_x_once_and_the_dropped_elements(p: float) -> None:
    """Saved bytes (unique storages) of the fast path vs. autograd's plain dropout path."""
    t = leaves(torch.float32)
    tokens = 2 * 5
    torch.manual_seed(0)
    mask, _ = draw_dropout(t["x"], p)

    def saved_bytes(fn) -> int:
        storages: dict[int, int] = {}
        own = {t[n].untyped_storage().data_ptr() for n in ("W", "b", "A", "B")}

        def pack(tensor: Tensor) -> Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in own:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        base_output = F.linear(t["x"], t["W"], t["b"])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fn(t["x"], base_output, t["A"], t["B"], 2.0, mask, 0.7)
        return sum(storages.values())

    def autograd_dropout(x, base_output, lora_A, lora_B, scaling, mask, keep):  # LoraLinear's plain path
        return base_output + F.linear(F.linear(F.dropout(x, 1 - keep, True), lora_A), lora_B) * scaling

    x_bytes, rank_bytes = tokens * IN * 4, tokens * RANK * 4
    # a mask: 1 byte per element; positions: 8 per drop, in the storage they were cut from (which
    # holds the few gaps drawn past the end as well)
    dropped_bytes = mask.untyped_storage().nbytes()
    assert dropped_bytes == tokens * IN if p > POSITIONS_UP_TO else mask.element_size() == 8
    assert saved_bytes(lora_linear) == x_bytes + dropped_bytes + rank_bytes  # x, the dropped, A·x
    assert saved_bytes(autograd_dropout) == 2 * x_bytes + rank_bytes  # float noise, dropped copy, A·x


# ----------------------------------------------------------------------------------- in LoraLinear
def wrapped(base: nn.Module, dropout: float, dtype: torch.dtype = torch.float32) -> peftkit.PeftModel:
    model = nn.Sequential()
    model.add_module("proj", base.to(dtype))
    config = peftkit.LoraConfig(
        r=RANK, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"], bias="all"
    )
    peft_model = peftkit.wrap(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".adapters." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return peft_model.train()


def layer_step(
    model: peftkit.PeftModel, x: Tensor, fast: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[Tensor, dict[str, Tensor], tuple[Tensor, float] | None]:
    """Output, gradients, and the (dropped, keep) the fast path drew (None on the plain path)."""
    drawn: list[tuple[Tensor | None, float]] = []
    real = lora_module.draw_dropout
    monkeypatch.setattr(lora_module, "draw_dropout", lambda *a: drawn.append(real(*a)) or drawn[-1])
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    with fast_lora(fast):
        out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(out.dtype))
    grads = {"x": x.grad} | {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    monkeypatch.setattr(lora_module, "draw_dropout", real)
    return out, grads, drawn[0] if drawn else None


def plain_layer(model: peftkit.PeftModel, x: Tensor, mask: Tensor | None, keep: float):
    """``W x + b + s·B·A·(x ⊙ mask / keep)`` with autograd on fresh leaves: (output, gradients)."""
    layer = model.model.proj
    adapter = layer.adapters["default"]
    weight = layer.base.weight.detach()
    weight = weight if isinstance(layer.base, nn.Linear) else weight.T  # Conv1D stores (in, out)
    leaves = {
        "x": x.detach().clone().requires_grad_(),
        "model.proj.base.bias": layer.base.bias.detach().clone().requires_grad_(),
        "model.proj.adapters.default.lora_A.weight": adapter.lora_A.weight.detach().clone().requires_grad_(),
        "model.proj.adapters.default.lora_B.weight": adapter.lora_B.weight.detach().clone().requires_grad_(),
    }
    x_, b, A, B = leaves.values()
    dropped = x_ if mask is None else x_ * mask / keep
    out = x_ @ weight.T + b + adapter.scaling * (dropped @ A.T @ B.T)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(6)))
    return out, {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("dropout", [0.0, 0.1, 0.3], ids=["p0", "positions", "mask"])
@pytest.mark.parametrize("layer", ["linear", "conv1d"])
def test_lora_linear_layer_equals_plain_pytorch(
    layer: str, dropout: float, fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs and gradients (x, A, B and the base bias, trained with ``bias="all"``) against the maths
    written out, with the mask each path drew: the fast path's recorded drops, or, on the plain path,
    ``nn.Dropout``'s (``bernoulli_`` on the same seed draws it again on CPU). On ``nn.Linear`` the fast
    path computes the base layer inside its op (``Conv1D``: its weight transposed)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(IN, OUT) if layer == "linear" else Conv1D(OUT, IN)
    model = wrapped(base, dropout)
    x = torch.randn(3, 6, IN)
    out, grads, drawn = layer_step(model, x, fast, monkeypatch)
    assert (drawn is not None) == fast
    if fast:
        dropped, keep = drawn
        assert (dropped is not None) == (dropout > 0)
        mask = keep_floats(dropped, x)
    elif dropout:
        torch.manual_seed(5)
        mask, keep = torch.empty_like(x).bernoulli_(1 - dropout) != 0, 1 - dropout
    else:
        mask, keep = None, 1.0
    expected, expected_grads = plain_layer(model, x, mask, keep)
    assert set(grads) == set(expected_grads)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=0, msg=f"grad of {name}")
    if dropout:  # dropout really acted: the output differs from the same model in eval mode
        with torch.no_grad():
            assert not torch.allclose(model.eval()(x), out.detach(), atol=1e-4)


def test_bf16_base_layer_fast_on_and_off_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = wrapped(nn.Linear(IN, OUT), 0.0, torch.bfloat16)
    x = torch.randn(3, 6, IN).to(torch.bfloat16)
    fast_out, fast_grads, _ = layer_step(model, x, True, monkeypatch)
    plain_out, plain_grads, _ = layer_step(model, x, False, monkeypatch)
    assert fast_out.dtype == torch.bfloat16
    torch.testing.assert_close(fast_out, plain_out, atol=ATOL[torch.bfloat16], rtol=0)
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=ATOL[torch.bfloat16], rtol=1e-2, msg=name)


def counting_ops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the fast ops LoraLinear calls, in order, from now on in the test."""
    calls: list[str] = []
    for name in ("lora_linear", "frozen_linear_lora"):
        real = getattr(lora_module, name)
        monkeypatch.setattr(lora_module, name, lambda *args, _n=name, _f=real: calls.append(_n) or _f(*args))
    return calls


def test_switch_and_hooks_decide_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_ops(monkeypatch)
    model = wrapped(nn.Linear(IN, OUT), 0.0)
    x = torch.randn(2, IN)
    with fast_lora(True):
        model(x)
    assert calls == ["frozen_linear_lora"]
    with fast_lora(False):
        assert not fast_lora_enabled()
        model(x)
    assert fast_lora_enabled() and len(calls) == 1  # the block restored the setting
    seen: list[int] = []
    handle = model.model.proj.adapters["default"].lora_A.register_forward_hook(lambda *_: seen.append(1))
    model(x)  # a hook on lora_A must see its call: the plain path runs
    handle.remove()
    assert len(calls) == 1 and seen == [1]
    set_fast_lora(False)
    try:
        model(x)
        assert len(calls) == 1
    finally:
        set_fast_lora(True)
    model(x)
    assert calls == ["frozen_linear_lora"] * 2


def test_base_inside_only_where_the_base_is_a_plain_frozen_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook on the base, a trained base weight, two adapters at once, a half-precision base with
    float32 adapters: the base layer runs on its own and the adapter adds to its output, and the output
    stays what the base-inside op gives."""
    calls = counting_ops(monkeypatch)
    model = wrapped(nn.Linear(IN, OUT), 0.0)
    layer = model.model.proj
    x = torch.randn(2, IN)
    expected = model(x).detach()
    assert calls == ["frozen_linear_lora"]

    seen: list[int] = []
    handle = layer.base.register_forward_hook(lambda *_: seen.append(1))
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    handle.remove()
    assert calls[-1] == "lora_linear" and seen == [1]

    layer.base.weight.requires_grad_(True)
    model(x)
    layer.base.weight.requires_grad_(False)
    assert calls[-1] == "lora_linear"

    model.add_adapter("second", peftkit.LoraConfig(r=RANK, target_modules=["proj"]))
    model.set_adapter(["default", "second"])
    calls.clear()
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)  # "second" starts with B = 0
    assert calls == ["lora_linear", "lora_linear"]

    half = wrapped(nn.Linear(IN, OUT), 0.0, torch.bfloat16)
    calls.clear()
    half(x.bfloat16())
    assert calls == ["lora_linear"]


def test_conv1d_base_runs_inside_the_op_with_its_weight_transposed(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.pytorch_utils import Conv1D

    calls = counting_ops(monkeypatch)
    model = wrapped(Conv1D(OUT, IN), 0.0)
    x = torch.randn(2, 3, IN)
    out = model(x)
    assert calls == ["frozen_linear_lora"]
    with fast_lora(False):
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=0)


def test_training_step_under_bf16_autocast_takes_the_plain_path() -> None:
    """Under CPU bf16 autocast the fast path stands aside: the step runs and its gradients equal the
    plain path's exactly (both are the plain path)."""
    grads = {}
    for enabled in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("proj", nn.Linear(IN, OUT))
        wrapped = peftkit.wrap(
            model, peftkit.LoraConfig(r=RANK, target_modules=["proj"], init_lora_weights=False)
        )
        x = torch.randn(3, IN)
        with fast_lora(enabled), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wrapped(x).float().pow(2).mean()
        loss.backward()
        grads[enabled] = {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=0, rtol=0)
