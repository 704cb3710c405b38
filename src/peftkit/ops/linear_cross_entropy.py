"""The output head and the cross-entropy in one pass over chunks of rows: the logits are never whole.

A language model's loss usually materialises ``(tokens, vocab)`` logits, their float32 copy, the
log-softmax that autograd saves and, in backward, two gradients of that size: for SmolLM2 (vocab
49,152) at 4 x 256 tokens that is ~200 MB each, more than the activations of all its layers under LoRA.
:func:`linear_cross_entropy` computes ``sum_i CE(W h_i, y_i)`` chunk by chunk and, since the loss is a
scalar, the gradients too, in the forward: ``softmax − onehot`` of a chunk times ``W`` (for h) and its
transpose times h (for W, when W trains). It keeps only ``∂loss/∂h`` (tokens x hidden) and ``∂loss/∂W``;
backward scales them by the incoming gradient. The arithmetic is that of the plain path (the same
matrix products), in float32; rows whose label is ``ignore_index`` are skipped.

:func:`linear_cross_entropy_reference` is the plain twin. The training losses use the fused path through
:mod:`peftkit.objectives` where the model's output head is a plain ``nn.Linear``;
turn it off with ``with peftkit.ops.fused_cross_entropy(False):`` or ``PEFTKIT_FUSED_CE=0``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.foundation.tasks import IGNORE_INDEX

__all__ = [
    "fused_cross_entropy",
    "fused_cross_entropy_enabled",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "plain_output_head",
]

CHUNK_ELEMENTS = 2**23  # float32 logits per chunk: 32 MiB (170 rows of a 49k vocabulary)
_FUSED = os.environ.get("PEFTKIT_FUSED_CE", "1").lower() not in ("0", "false", "no", "off")


def fused_cross_entropy_enabled() -> bool:
    """Whether the training loss uses :func:`linear_cross_entropy` where it applies (default: yes)."""
    return _FUSED


@contextmanager
def fused_cross_entropy(enabled: bool) -> Iterator[None]:
    """``with fused_cross_entropy(False): ...`` computes the loss from whole logits inside the block."""
    global _FUSED
    previous, _FUSED = _FUSED, bool(enabled)
    try:
        yield
    finally:
        _FUSED = previous


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels``, and the count of scored rows.

    Args:
        hidden: (N, hidden), the output head's input; any float dtype.
        weight: (vocab, hidden), the head's weight (no bias).
        labels: (N,) token ids, ``-100`` where nothing is scored.
        chunk_elements: float32 logits computed at once (rows per chunk = this // vocab, at least 1).

    Returns:
        ``(loss_sum, count)``, 0-dim; ``loss_sum`` is float32 and differentiable w.r.t. hidden and weight.
    """
    count = (labels != IGNORE_INDEX).sum()
    needs_graph = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_graph:
        loss, _, _ = _chunks(hidden, weight, labels, chunk_elements, False, False)
        return loss, count
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_elements), count


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The plain twin: whole float32 logits, ``F.cross_entropy(reduction="sum")``, autograd's backward."""
    logits = hidden.float() @ weight.float().T  # (N, vocab)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def _chunks(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_elements: int, grad_hidden: bool, grad_weight: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(loss_sum, ∂loss/∂hidden (N, hidden) or None, ∂loss/∂weight (vocab, hidden) or None), float32."""
    with torch.autocast(hidden.device.type, enabled=False):
        scored = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (S,) rows with a target
        w = weight.float()  # (vocab, hidden): a copy only for half-precision heads
        d_hidden = (
            torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if grad_hidden else None
        )
        d_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if grad_weight else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(1, chunk_elements // w.shape[0])
        for start in range(0, len(scored), rows):
            index = scored[start : start + rows]  # (R,)
            h = hidden.index_select(0, index).float()  # (R, hidden)
            target = labels.index_select(0, index)  # (R,)
            logits = h @ w.T  # (R, vocab)
            log_norm = torch.logsumexp(logits, dim=1)  # (R,)
            loss += (log_norm - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if d_hidden is None and d_weight is None:
                continue
            probs = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place: (R, vocab)
            probs[torch.arange(len(index), device=probs.device), target] -= 1.0  # ∂CE/∂logits
            if d_hidden is not None:
                d_hidden.index_copy_(0, index, probs @ w)
            if d_weight is not None:
                d_weight.addmm_(probs.T, h)
    return loss, d_hidden, d_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Gradients computed in forward (the loss is a scalar); backward scales them."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        chunk_elements: int,
    ) -> Tensor:
        loss, d_hidden, d_weight = _chunks(
            hidden, weight, labels, chunk_elements, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        d_hidden, d_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = None if d_hidden is None else (d_hidden * grad_loss).to(hidden_dtype)
        grad_weight = None if d_weight is None else (d_weight * grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, None, None


# The config fields of models whose logits are more than the head's output (scaled, soft-capped).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def plain_output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head when the fused loss can stand in for it, else None."""
    while hasattr(model, "module"):  # DistributedDataParallel and similar wrappers
        model = model.module
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or head.bias is not None or "forward" in vars(head):
        return None  # adapted, biased, or already hooked (accelerate's device hooks replace forward)
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head
