"""Per-token log-probabilities through the output head, chunk by chunk: the logits are never whole.

Preference losses (DPO, ORPO, SimPO) need ``log p(y_t | y_<t)`` of every answer token, a vector, not
one scalar: :func:`peftkit.ops.linear_cross_entropy` cannot serve. :func:`linear_log_probs` computes
``log_softmax(h_i W^T)[y_i]`` for the given rows over chunks of rows, so at most one chunk of float32
logits exists at a time. Each token's log-probability depends on its own ``h_i`` only, so its gradient
``∂ log p_i / ∂h_i = (onehot(y_i) − softmax(W h_i)) W`` is known in the forward; that is kept
(tokens × hidden, float32) and backward scales each row by its incoming gradient. When the head's
weight trains, its gradient ``Σ_i g_i (onehot − p_i)^T h_i`` needs the incoming ``g``, so backward
computes it chunk by chunk again from the saved inputs.

:func:`linear_log_probs_reference` is the plain twin (whole logits, autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor

from peftkit.ops.linear_cross_entropy import CHUNK_ELEMENTS

__all__ = ["linear_log_probs", "linear_log_probs_reference"]


def linear_log_probs(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_elements: int = CHUNK_ELEMENTS
) -> Tensor:
    """``log_softmax(hidden @ weight.T)`` at ``targets``, one value per row, without whole logits.

    Args:
        hidden: (N, hidden), the output head's input at the scored positions; any float dtype.
        weight: (vocab, hidden), the head's weight (no bias).
        targets: (N,) token ids, every one scored.
        chunk_elements: float32 logits computed at once (rows per chunk = this // vocab, at least 1).

    Returns:
        (N,) float32 log-probabilities, differentiable w.r.t. ``hidden`` and ``weight``.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearLogProbs.apply(hidden, weight, targets, chunk_elements)
    return _forward_chunks(hidden, weight, targets, chunk_elements, False)[0]


def linear_log_probs_reference(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """The plain twin: whole float32 logits, ``log_softmax``, ``gather``; autograd's backward."""
    logits = hidden.float() @ weight.float().T  # (N, vocab)
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def _rows_per_chunk(vocab: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // vocab)


def _forward_chunks(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_elements: int, grad_hidden: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(log-probs (N,), log-normalisers (N,), ∂log p_i/∂h_i (N, hidden) or None), all float32."""
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.float()  # (vocab, hidden): a copy only for half-precision heads
        n = hidden.shape[0]
        log_probs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        log_norms = torch.empty(n, dtype=torch.float32, device=hidden.device)
        d_hidden = (
            torch.empty((n, w.shape[1]), dtype=torch.float32, device=hidden.device) if grad_hidden else None
        )
        rows = _rows_per_chunk(w.shape[0], chunk_elements)
        for start in range(0, n, rows):
            end = min(start + rows, n)
            h = hidden[start:end].float()  # (R, hidden)
            target = targets[start:end]  # (R,)
            logits = h @ w.T  # (R, vocab)
            log_norm = torch.logsumexp(logits, dim=1)  # (R,)
            log_norms[start:end] = log_norm
            log_probs[start:end] = logits.gather(1, target[:, None]).squeeze(1) - log_norm
            if d_hidden is None:
                continue
            probs = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place: (R, vocab)
            probs[torch.arange(end - start, device=probs.device), target] -= 1.0  # −∂log p/∂logits
            torch.matmul(probs, w, out=d_hidden[start:end]).neg_()
    return log_probs, log_norms, d_hidden


def _weight_gradient(
    hidden: Tensor, weight: Tensor, targets: Tensor, log_norms: Tensor, grad: Tensor, chunk_elements: int
) -> Tensor:
    """``Σ_i grad_i · (onehot(y_i) − softmax(W h_i))^T h_i``: (vocab, hidden), float32, chunk by chunk."""
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.float()
        d_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        rows = _rows_per_chunk(w.shape[0], chunk_elements)
        for start in range(0, hidden.shape[0], rows):
            end = min(start + rows, hidden.shape[0])
            h = hidden[start:end].float()  # (R, hidden)
            probs = (h @ w.T).sub_(log_norms[start:end, None]).exp_()  # (R, vocab)
            probs[torch.arange(end - start, device=probs.device), targets[start:end]] -= 1.0
            probs.mul_(-grad[start:end, None])  # grad_i · (onehot − p_i)
            d_weight.addmm_(probs.T, h)
    return d_weight


class _LinearLogProbs(torch.autograd.Function):
    """∂/∂hidden computed in forward (each row's own); ∂/∂weight in backward (it needs the incoming
    gradient of every row)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk_elements: int,
    ) -> Tensor:
        log_probs, log_norms, d_hidden = _forward_chunks(
            hidden, weight, targets, chunk_elements, ctx.needs_input_grad[0]
        )
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(d_hidden, hidden, weight, targets, log_norms)
        else:
            ctx.save_for_backward(d_hidden)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.chunk_elements = chunk_elements
        return log_probs

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad = grad.float()
        d_hidden = saved[0]
        grad_hidden = None if d_hidden is None else (d_hidden * grad[:, None]).to(hidden_dtype)
        grad_weight = None
        if len(saved) > 1:
            _, hidden, weight, targets, log_norms = saved
            grad_weight = _weight_gradient(hidden, weight, targets, log_norms, grad, ctx.chunk_elements)
            grad_weight = grad_weight.to(weight_dtype)
        return grad_hidden, grad_weight, None, None
