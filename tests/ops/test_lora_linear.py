"""The fast LoRA linear path against plain PyTorch: outputs and gradients of x, A, B and the base bias.

The reference is written out here (``W x + b + s·B·A·(x ⊙ m / keep)`` through autograd), independent of
the function under test. Tolerances: float32 atol 1e-5 (the same products summed in another order);
bfloat16 inputs atol 2e-2 (one bf16 rounding of values of order 1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import peftkit
from peftkit.methods.lora import layers as lora_module
from peftkit.ops import (
    dropout_mask,
    fast_lora,
    fast_lora_enabled,
    lora_linear,
    lora_linear_reference,
    set_fast_lora,
)

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
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


def plain(t: dict[str, Tensor], scaling: float, mask: Tensor | None, keep: float) -> Tensor:
    """The expected output, spelled out."""
    dropped = t["x"].float() if mask is None else t["x"].float() * mask / keep
    update = scaling * (dropped @ t["A"].T @ t["B"].T)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("function", [lora_linear, lora_linear_reference], ids=["fast", "reference-twin"])
def test_outputs_and_gradients_equal_plain_pytorch(function, p: float, dtype: torch.dtype) -> None:
    t = leaves(dtype)
    torch.manual_seed(3)
    mask, keep = dropout_mask(t["x"], p) if p > 0 else (None, 1.0)
    out, grads = outputs_and_grads(function, t, 2.5, mask, keep)
    expected, expected_grads = expected_and_grads(t, 2.5, mask, keep)
    atol = ATOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=atol, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=atol, rtol=0, msg=f"grad of {name}")


def test_no_gradient_needed_gives_the_same_output_without_a_graph() -> None:
    t = leaves(torch.float32)
    with torch.no_grad():
        base_output = F.linear(t["x"], t["W"], t["b"])
        out = lora_linear(t["x"], base_output, t["A"], t["B"], 0.5)
        expected = plain(t, 0.5, None, 1.0)
    assert out.grad_fn is None
    torch.testing.assert_close(out, expected, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_mask_keeps_the_stated_share(p: float) -> None:
    """Kept share within 5 binomial standard deviations of the returned keep probability, which is
    ``1 - p`` to 1/65536; seeded draws repeat, later draws differ."""
    x = torch.empty(1000, 999)  # a size that is not a multiple of 4 (four masks per 64-bit draw)
    torch.manual_seed(11)
    mask, keep = dropout_mask(x, p)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert abs(keep - (1 - p)) <= 0.5 / 65536
    sigma = (keep * (1 - keep) / mask.numel()) ** 0.5
    assert abs(mask.float().mean().item() - keep) < 5 * sigma
    torch.manual_seed(11)
    assert torch.equal(dropout_mask(x, p)[0], mask)
    assert not torch.equal(dropout_mask(x, p)[0], mask)
    assert dropout_mask(x, 0.0)[0].all()
    with pytest.raises(ValueError, match=r"p=1\.0"):
        dropout_mask(x, 1.0)


def test_saves_x_once_and_a_bool_mask() -> None:
    """Saved bytes (unique storages) of the fast path vs. autograd's plain dropout path."""
    t = leaves(torch.float32)
    tokens = 2 * 5
    mask, _ = dropout_mask(t["x"], 0.3)

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
    assert saved_bytes(lora_linear) == x_bytes + tokens * IN + rank_bytes  # x, bool mask, A·x
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
    """Output, gradients, and the (mask, keep) the fast path drew (None on the plain path)."""
    drawn: list[tuple[Tensor, float]] = []
    real = lora_module.dropout_mask
    monkeypatch.setattr(lora_module, "dropout_mask", lambda *a: drawn.append(real(*a)) or drawn[-1])
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    with fast_lora(fast):
        out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(out.dtype))
    grads = {"x": x.grad} | {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    monkeypatch.setattr(lora_module, "dropout_mask", real)
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
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("layer", ["linear", "conv1d"])
def test_lora_linear_layer_equals_plain_pytorch(
    layer: str, dropout: float, fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs and gradients (x, A, B and the base bias, trained with ``bias="all"``) against the maths
    written out, with the mask each path drew: the fast path's recorded bool mask, or, on the plain
    path, ``nn.Dropout``'s (``bernoulli_`` on the same seed draws it again on CPU)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(IN, OUT) if layer == "linear" else Conv1D(OUT, IN)
    model = wrapped(base, dropout)
    x = torch.randn(3, 6, IN)
    out, grads, drawn = layer_step(model, x, fast, monkeypatch)
    assert (drawn is not None) == (fast and dropout > 0)
    if drawn is not None:
        mask, keep = drawn
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


def test_switch_and_hooks_decide_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = lora_module.lora_linear
    monkeypatch.setattr(lora_module, "lora_linear", lambda *args: calls.append(1) or real(*args))
    model = wrapped(nn.Linear(IN, OUT), 0.0)
    x = torch.randn(2, IN)
    with fast_lora(True):
        model(x)
    assert calls == [1]
    with fast_lora(False):
        assert not fast_lora_enabled()
        model(x)
    assert fast_lora_enabled() and calls == [1]  # the block restored the setting
    seen: list[int] = []
    handle = model.model.proj.adapters["default"].lora_A.register_forward_hook(lambda *_: seen.append(1))
    model(x)  # a hook on lora_A must see its call: the plain path runs
    handle.remove()
    assert calls == [1] and seen == [1]
    set_fast_lora(False)
    try:
        model(x)
        assert calls == [1]
    finally:
        set_fast_lora(True)
    model(x)
    assert calls == [1, 1]


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
