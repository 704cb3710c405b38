"""LoRA on a linear layer with a hand-written backward: ``y + s·((x ⊙ m / keep)·Aᵀ)·Bᵀ``.

:func:`lora_linear_reference` is the plain-PyTorch twin (what ``LoraLinear`` computes with autograd);
:func:`lora_linear` computes the same numbers and gradients while holding less and doing less:

- **One saved input.** Autograd's dropout keeps its float noise *and* the dropped copy of x for every
  adapted layer (two full-size tensors each; q, k and v make three pairs). Here x itself is saved, the
  same tensor for every projection that reads it, plus a ``bool`` mask (1 byte per element); the
  dropped input is recomputed in backward.
- **Dropout on the rank-r path only**, with ``1/keep`` and the scaling ``s`` applied to the small
  ``(N, r)`` / ``(r, out)`` products instead of full-size tensors; ``y + s·h·Bᵀ`` is one ``addmm``.
- **No frozen-weight gradient.** The base layer's output is an input here and its gradient is passed
  straight back; the base weight is never read, so nothing is built for it.

:func:`dropout_mask` draws 16 random bits per element (four per 64-bit draw of the default generator,
about four times cheaper than ``bernoulli_``, which dominated dropout's cost): ``p`` is rounded to a
multiple of 1/65536 (off by at most 7.6e-6) and kept values are divided by that exact keep probability,
so the expected output is unchanged. The masks differ from ``nn.Dropout``'s for the same seed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

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


def dropout_mask(x: Tensor, p: float) -> tuple[Tensor, float]:
    """A ``bool`` keep-mask shaped like ``x`` and its keep probability (``1 - p`` to 1/65536).

    Raises:
        ValueError: ``p`` outside [0, 1).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p!r} must be in [0, 1)")
    dropped_levels = round(p * 65536)  # a uniform 16-bit value below this is dropped
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-(2**63), None)  # all 64 bits random (the default range leaves the sign bit 0)
    uniform16 = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform on [-32768, 32767]
    return uniform16 >= dropped_levels - 32768, 1.0 - dropped_levels / 65536


def lora_linear(
    x: Tensor,
    base_output: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    mask: Tensor | None = None,
    keep_prob: float = 1.0,
) -> Tensor:
    """``base_output + scaling·((x ⊙ mask / keep_prob)·Aᵀ)·Bᵀ`` with the memory-lean backward above.

    Args:
        x: (..., in_features), the base layer's input; any float dtype (cast to A's dtype for the
            low-rank path).
        base_output: (..., out_features), the base layer's output for ``x``.
        lora_A: (r, in_features).
        lora_B: (out_features, r), same dtype as ``lora_A``.
        scaling: s.
        mask: ``bool``, shaped like ``x`` (see :func:`dropout_mask`), or None for no dropout.
        keep_prob: ``1 - p``; the kept elements are divided by it.

    Returns:
        (..., out_features) in ``base_output``'s dtype.
    """
    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (x, base_output, lora_A, lora_B))
    if needs_graph:
        return _LoraLinearFunction.apply(x, base_output, lora_A, lora_B, scaling, mask, keep_prob)
    out, _ = _forward(x, base_output, lora_A, lora_B, scaling, mask, keep_prob)
    return out


def lora_linear_reference(
    x: Tensor,
    base_output: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    mask: Tensor | None = None,
    keep_prob: float = 1.0,
) -> Tensor:
    """The plain-PyTorch twin of :func:`lora_linear` (autograd does the backward); same arguments."""
    dropped = x.to(lora_A.dtype)
    if mask is not None:
        dropped = dropped * mask / keep_prob
    update = (dropped @ lora_A.T @ lora_B.T) * scaling
    return base_output + update.to(base_output.dtype)


def _masked(x2: Tensor, mask2: Tensor | None, dtype: torch.dtype) -> Tensor:
    """x with dropped elements zeroed (not yet divided by keep_prob), in the adapter dtype: (N, in).

    ``mask2`` is the bool mask, or the same as 0./1. floats of ``dtype``: float x float multiplies are
    vectorised, float x bool ones are about three times slower on CPU.
    """
    if mask2 is None:
        return x2.to(dtype)
    return x2 * (mask2 if mask2.dtype == dtype else mask2.to(dtype))


def _forward(
    x: Tensor,
    base_output: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    mask: Tensor | None,
    keep_prob: float,
) -> tuple[Tensor, Tensor]:
    """(output, h) where h = (x ⊙ mask)·Aᵀ / keep_prob: (N, r), kept for the backward."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    mask2 = None if mask is None else mask.reshape(x2.shape)
    h = _masked(x2, mask2, lora_A.dtype) @ lora_A.T  # (N, r)
    if mask is not None:
        h = h.mul_(1.0 / keep_prob)
    base2 = base_output.reshape(-1, base_output.shape[-1])  # (N, out)
    if base_output.dtype == lora_B.dtype:
        out = torch.addmm(base2, h, lora_B.T, alpha=scaling)
    else:  # half-precision base, float32 adapter: the update is computed in float32, then cast
        out = base2 + (h @ lora_B.T).mul_(scaling).to(base_output.dtype)
    return out.view(base_output.shape), h


class _LoraLinearFunction(torch.autograd.Function):
    """Saves x (shared with sibling layers), the bool mask, h (N, r) and the two small factors."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        base_output: Tensor,
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: float,
        mask: Tensor | None,
        keep_prob: float,
    ) -> Tensor:
        out, h = _forward(x, base_output, lora_A, lora_B, scaling, mask, keep_prob)
        ctx.save_for_backward(x, h, lora_A, lora_B, mask)
        ctx.scaling = scaling
        ctx.keep_prob = keep_prob
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, h, lora_A, lora_B, mask = ctx.saved_tensors
        scaling, keep_prob = ctx.scaling, ctx.keep_prob
        needs_x, needs_base, needs_A, needs_B = ctx.needs_input_grad[:4]
        grad2 = grad_out.reshape(-1, grad_out.shape[-1]).to(lora_B.dtype)  # (N, out)
        grad_x = grad_A = grad_B = None
        if needs_B:
            grad_B = (grad2.T @ h).mul_(scaling)  # (out, r)
        if needs_x or needs_A:
            grad_h = (grad2 @ lora_B).mul_(scaling)  # (N, r)
            if mask is not None:
                grad_h = grad_h.mul_(1.0 / keep_prob)
            x2 = x.reshape(-1, x.shape[-1])
            mask2 = None if mask is None else mask.reshape(x2.shape).to(lora_A.dtype)  # used twice
            if needs_A:
                grad_A = grad_h.T @ _masked(x2, mask2, lora_A.dtype)  # (r, in)
            if needs_x:
                # Written into a tensor of x's shape, not a view: autograd then adds the base layer's
                # gradient for x into it in place instead of allocating a sum.
                grad_x = torch.empty(x.shape, dtype=lora_A.dtype, device=x.device)
                grad_x2 = torch.mm(grad_h, lora_A, out=grad_x.view(-1, x.shape[-1]))  # (N, in)
                if mask2 is not None:
                    grad_x2.mul_(mask2)
                grad_x = grad_x.to(x.dtype)
        grad_base = grad_out if needs_base else None
        return grad_x, grad_base, grad_A, grad_B, None, None, None
