"""LoRA on a linear layer with a hand-written backward: ``y + s·((x ⊙ m / keep)·Aᵀ)·Bᵀ``.

:func:`lora_linear` takes the base layer's output; :func:`frozen_linear_lora` computes a frozen
``nn.Linear`` and the adapter in one op. :func:`lora_linear_reference` is the plain-PyTorch twin (what
``LoraLinear`` computes with autograd). The fast ops compute the same numbers and gradients while
holding less and doing less:

- **One saved input.** Autograd's dropout keeps its float noise *and* the dropped copy of x for every
  adapted layer (two full-size tensors each; q, k and v make three pairs). Here x itself is saved, the
  same tensor for every projection that reads it, plus which elements were dropped (positions, 8·p
  bytes per element, or a bool mask: :mod:`peftkit.ops.dropout`); the dropped input is recomputed in
  backward.
- **Dropout on the rank-r path only**, with ``1/keep`` and the scaling ``s`` applied to the small
  ``(N, r)`` / ``(r, out)`` products instead of full-size tensors; ``y + s·h·Bᵀ`` is one ``addmm``.
- **No frozen-weight gradient.** The base weight's gradient is never built.
- **With the base layer inside** (:func:`frozen_linear_lora`): the update is added into the base
  output in place, and in backward the base layer's input gradient is accumulated into the adapter's
  (``addmm_``), so autograd neither allocates a second full-size gradient of x nor adds the two.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from peftkit.ops.dropout import keep_mask, zero_dropped_

_FAST_LORA = os.environ.get("PEFTKIT_FAST_LORA", "1").lower() not in ("0", "false", "no", "off")


def fast_lora_enabled() -> bool:
    """Whether ``LoraLinear`` uses :func:`lora_linear` where it applies (default: yes)."""
    return _FAST_LORA


def set_fast_lora(enabled: bool) -> None:
    """Turn the fast LoRA path on or off for the whole process (``PEFTKIT_FAST_LORA=0`` at start-up)."""
    global _FAST_LORA
    _FAST_LORA = bool(enabled)


@contextmanager
def fast_lora(enabled: bool) -> Iterator[None]:
    """``with fast_lora(False): ...`` runs the block on the plain autograd path, then restores the setting."""
    previous = fast_lora_enabled()
    set_fast_lora(enabled)
    try:
        yield
    finally:
        set_fast_lora(previous)


def lora_linear(
    x: Tensor,
    base_output: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropped: Tensor | None = None,
    keep_prob: float = 1.0,
) -> Tensor:
    """``base_output + scaling·((x ⊙ keep / keep_prob)·Aᵀ)·Bᵀ`` with the memory-lean backward above.

    Args:
        x: (..., in_features), the base layer's input; any float dtype (cast to A's dtype for the
            low-rank path).
        base_output: (..., out_features), the base layer's output for ``x``.
        lora_A: (r, in_features).
        lora_B: (out_features, r), same dtype as ``lora_A``.
        scaling: s.
        dropped: which elements of x dropout drops, as :func:`peftkit.ops.draw_dropout` gives them
            (flat positions or a bool mask shaped like x), or None for no dropout.
        keep_prob: the kept elements are divided by it (``draw_dropout``'s second value).

    Returns:
        (..., out_features) in ``base_output``'s dtype.
    """
    return _run(x, base_output, None, None, lora_A, lora_B, scaling, dropped, keep_prob)


def frozen_linear_lora(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropped: Tensor | None = None,
    keep_prob: float = 1.0,
) -> Tensor:
    """``F.linear(x, weight, bias)`` plus the LoRA update, as one op (see the module docstring).

    Args:
        x: (..., in_features), in ``weight``'s dtype.
        weight: (out_features, in_features), frozen; same dtype as x, A and B.
        bias: (out_features,) or None; may be trained.
        lora_A, lora_B, scaling, dropped, keep_prob: as for :func:`lora_linear`.

    Returns:
        (..., out_features) in x's dtype.

    Raises:
        ValueError: ``weight`` requires a gradient, or the dtypes differ.
    """
    if weight.requires_grad:
        raise ValueError("frozen_linear_lora: weight requires a gradient; use lora_linear after the layer")
    if not x.dtype == weight.dtype == lora_A.dtype == lora_B.dtype:
        raise ValueError(
            f"frozen_linear_lora: x ({x.dtype}), weight ({weight.dtype}), lora_A ({lora_A.dtype}) and "
            f"lora_B ({lora_B.dtype}) must share one dtype; use lora_linear after the layer"
        )
    return _run(x, None, weight, bias, lora_A, lora_B, scaling, dropped, keep_prob)


def lora_linear_reference(
    x: Tensor,
    base_output: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropped: Tensor | None = None,
    keep_prob: float = 1.0,
) -> Tensor:
    """The plain-PyTorch twin of :func:`lora_linear` (autograd does the backward); same arguments."""
    dropped_x = x.to(lora_A.dtype)
    if dropped is not None:
        dropped_x = dropped_x * keep_mask(dropped, x).to(lora_A.dtype) / keep_prob
    update = (dropped_x @ lora_A.T @ lora_B.T) * scaling
    return base_output + update.to(base_output.dtype)


def _run(*args: Any) -> Tensor:
    """:class:`_LoraLinearFunction` on ``_forward``'s arguments where a gradient is needed (a tensor
    among x, the base output, the bias, A and B requires one), else the forward alone, no graph."""
    x, base_output, _, bias, lora_A, lora_B = args[:6]
    inputs = (t for t in (x, base_output, bias, lora_A, lora_B) if t is not None)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _LoraLinearFunction.apply(*args)
    return _forward(*args)[0]


def _adapter_input(x2: Tensor, dropped: Tensor | None, dtype: torch.dtype) -> Tensor:
    """x with the dropped elements zeroed (not yet divided by keep_prob), in the adapter dtype: (N, in).

    A copy when anything is dropped (one pass: the cast, or a clone), x itself otherwise.
    """
    if dropped is None:
        return x2.to(dtype)
    return zero_dropped_(x2.to(dtype, copy=True, memory_format=torch.contiguous_format), dropped)


def _forward(
    x: Tensor,
    base_output: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropped: Tensor | None,
    keep_prob: float,
) -> tuple[Tensor, Tensor]:
    """(output, h) where h = (x ⊙ keep)·Aᵀ / keep_prob: (N, r), kept for the backward.

    The base output is ``base_output`` (updated out of place), or ``F.linear(x, weight, bias)``
    computed here and updated in place.
    """
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    h = _adapter_input(x2, dropped, lora_A.dtype) @ lora_A.T  # (N, r)
    if dropped is not None:
        h = h.mul_(1.0 / keep_prob)
    if base_output is None:
        out2 = F.linear(x2, weight, bias).addmm_(h, lora_B.T, alpha=scaling)  # (N, out)
        return out2.view(*x.shape[:-1], -1), h
    base2 = base_output.reshape(-1, base_output.shape[-1])  # (N, out)
    if base_output.dtype == lora_B.dtype:
        out2 = torch.addmm(base2, h, lora_B.T, alpha=scaling)
    else:  # half-precision base, float32 adapter: the update is computed in float32, then cast
        out2 = base2 + (h @ lora_B.T).mul_(scaling).to(base_output.dtype)
    return out2.view(base_output.shape), h


class _LoraLinearFunction(torch.autograd.Function):
    """Saves x (shared with sibling layers), the dropped elements, h (N, r), the factors and the frozen
    weight where the base layer is inside."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        base_output: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: float,
        dropped: Tensor | None,
        keep_prob: float,
    ) -> Tensor:
        out, h = _forward(x, base_output, weight, bias, lora_A, lora_B, scaling, dropped, keep_prob)
        ctx.save_for_backward(x, h, lora_A, lora_B, dropped, weight)
        ctx.scaling = scaling
        ctx.keep_prob = keep_prob
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, h, lora_A, lora_B, dropped, weight = ctx.saved_tensors
        scaling, keep_prob = ctx.scaling, ctx.keep_prob
        needs_x, needs_base, _, needs_bias, needs_A, needs_B = ctx.needs_input_grad[:6]
        grad_out2 = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_rank = grad_out2.to(lora_B.dtype)
        grad_x = grad_bias = grad_A = grad_B = None
        if needs_B:
            grad_B = (h.T @ grad_rank).mul_(scaling).T  # (out, r); this order is about 2x faster on CPU
        if needs_bias:
            grad_bias = grad_out2.sum(0)  # (out,)
        if needs_x or needs_A:
            grad_h = (grad_rank @ lora_B).mul_(scaling / keep_prob)  # (N, r)
            x2 = x.reshape(-1, x.shape[-1])
            adapter_input = None
            if needs_A:
                adapter_input = _adapter_input(x2, dropped, lora_A.dtype)  # (N, in)
                grad_A = grad_h.T @ adapter_input  # (r, in)
            if needs_x:
                # Written into a tensor of x's shape, not a view: autograd then adds any other gradient
                # of x (the base layer's, when it is not inside) into it in place. The dropped copy of x
                # is done with: its memory is reused when it is a copy of x's shape and dtype.
                reusable = adapter_input is not None and adapter_input.data_ptr() != x2.data_ptr()
                if reusable and adapter_input.dtype == x.dtype:
                    grad_x = adapter_input.view(x.shape)
                else:
                    grad_x = torch.empty(x.shape, dtype=lora_A.dtype, device=x.device)
                grad_x2 = torch.mm(grad_h, lora_A, out=grad_x.view(-1, x.shape[-1]))  # (N, in)
                if dropped is not None:
                    zero_dropped_(grad_x2, dropped)
                if weight is not None:
                    grad_x2.addmm_(grad_out2, weight)  # the frozen layer's input gradient, accumulated
                grad_x = grad_x.to(x.dtype)
        grad_base = grad_out if needs_base else None
        return grad_x, grad_base, None, grad_bias, grad_A, grad_B, None, None, None
