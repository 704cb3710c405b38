"""A causal LM's own training loss computed by the fused head (:func:`peftkit.ops.linear_cross_entropy`).

Inside :func:`fused_model_loss`, a transformers causal LM called with ``labels`` returns the loss its
``loss_function`` (``ForCausalLMLoss``) would give — labels shifted by one, ``ignore_index`` skipped,
summed and divided by ``num_items_in_batch`` when given, else averaged — but the vocabulary-sized
logits, their float32 copy and their gradients are never whole: the output head returns an empty
``(batch, seq, 0)`` tensor and the loss is computed chunk by chunk from the head's input. So the
outputs carry no logits: this is for training steps, where only the loss is read. Where the fused
head cannot stand in (an adapted, biased or scaled head; a loss other than ``ForCausalLM``; a head
input that does not line up with the labels) the model runs as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.foundation.tasks import IGNORE_INDEX
from peftkit.ops import fused_cross_entropy_enabled, linear_cross_entropy, plain_output_head

__all__ = ["fused_model_loss"]


@contextmanager
def fused_model_loss(model: nn.Module) -> Iterator[bool]:
    """Within the block, ``model(..., labels=...)`` computes its loss with the fused head; yields
    whether it does (False: the model is left as it is, see the module docstring).

    Args:
        model: a transformers causal LM, or a wrapper of one (a ``PeftModel``, DDP's ``module``).
    """
    base = _causal_lm(model)
    head = plain_output_head(base) if base is not None and fused_cross_entropy_enabled() else None
    if head is None:
        yield False
        return
    own_loss = base.loss_function
    captured: list[Tensor] = []

    def keep_input(hidden: Tensor) -> Tensor:  # (batch, seq, hidden) -> (batch, seq, 0): no logits
        captured.append(hidden)
        return hidden.new_empty((*hidden.shape[:-1], 0))

    def loss(
        logits: Tensor,
        labels: Tensor,
        vocab_size: int,
        num_items_in_batch: Tensor | int | None = None,
        ignore_index: int = IGNORE_INDEX,
        shift_labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        hidden = captured.pop()  # (batch, seq, hidden)
        if shift_labels is None:  # position t predicts token t + 1, as ForCausalLMLoss shifts
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        if hidden.shape[:-1] != shift_labels.shape or kwargs:  # not the plain case: the model's own way
            logits = F.linear(hidden, head.weight)
            return own_loss(
                logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs
            )
        targets = shift_labels.to(hidden.device).reshape(-1)
        if ignore_index != IGNORE_INDEX:
            targets = targets.masked_fill(targets == ignore_index, IGNORE_INDEX)
        total, count = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets)
        if num_items_in_batch is None:
            return total / count
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    had_own = "_loss_function" in vars(base)
    head.forward = keep_input
    base.loss_function = loss
    try:
        yield True
    finally:
        del head.forward
        if had_own:
            base.loss_function = own_loss
        else:
            del base._loss_function


def _causal_lm(model: nn.Module) -> Any:
    """The transformers causal LM inside ``model`` whose loss goes through ``loss_function``, or None."""
    while hasattr(model, "module"):  # DistributedDataParallel and similar wrappers
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    loss_type = getattr(base, "loss_type", None)
    if not hasattr(type(base), "loss_function") or loss_type not in (None, "ForCausalLM"):
        return None
    return base
