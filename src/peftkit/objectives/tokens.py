"""The token cross-entropy: ``peftkit train``'s objective for every task, and a model's own loss elsewhere.

A causal LM's next-token loss goes through the fused head (:func:`peftkit.ops.linear_cross_entropy`:
the output head and the cross-entropy computed together, chunk by chunk, so the vocabulary-sized logits
of the batch never exist) wherever the head is a plain ``nn.Linear``. The model itself runs unchanged
with its head's ``forward`` swapped for a stub that keeps the head's input (:func:`head_inputs`), so
every model, wrapper and soft prompt works as it is. Two entry points:

- :func:`loss_sum`: ``peftkit train``'s loss of a collated batch, ``(summed loss, scored targets)``,
  for ``causal-lm`` (fused where it applies; padded or packed, :mod:`~peftkit.objectives.packed`),
  ``seq2seq-lm`` and ``seq-cls`` (whole logits);
- :func:`fused_model_loss`: a block in which a transformers causal LM called with ``labels``
  computes its own loss (``ForCausalLMLoss``) the fused way (``peftkit.integrations.Trainer``).

:func:`token_objective` is this module's :class:`~peftkit.objectives.Objective`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.foundation.tasks import IGNORE_INDEX
from peftkit.objectives import Objective
from peftkit.objectives.packed import inner_model, packed_attention, packed_inputs
from peftkit.ops import fused_cross_entropy_enabled, linear_cross_entropy, plain_output_head

__all__ = [
    "forward_logits",
    "fused_model_loss",
    "head_inputs",
    "inner_model",
    "loss_sum",
    "takes_logits_to_keep",
    "token_loss_sum",
    "token_objective",
]


def token_objective(task: str) -> Objective:
    """The token cross-entropy of ``task`` (``causal-lm``, ``seq2seq-lm``, ``seq-cls``): :func:`loss_sum`."""
    return functools.partial(loss_sum, task=task)


def loss_sum(model: nn.Module, batch: Mapping[str, Tensor], task: str) -> tuple[Tensor, Tensor]:
    """Run ``model`` on a collated batch and return its summed loss and scored-target count.

    For a causal model whose output head is a plain ``nn.Linear`` (not adapted, no bias, no logit
    scaling or soft-capping in its config) the head and the loss are computed together by
    :func:`peftkit.ops.linear_cross_entropy`; otherwise (or with
    ``peftkit.ops.fused_cross_entropy(False)``) this is :func:`token_loss_sum` of
    :func:`forward_logits`. Both give the same loss and gradients.

    Args:
        batch: ``input_ids``, ``attention_mask`` (batch, seq) and ``labels`` (batch, seq), or (batch,)
            class indices for ``seq-cls``; or a packed ``causal-lm`` batch (``input_ids``, ``labels``,
            ``position_ids`` (1, tokens) and ``cu_seq_lens``), each example attending only to itself.

    Returns:
        ``(loss_sum, count)``: 0-dim tensors.
    """
    if task == "causal-lm" and fused_cross_entropy_enabled():
        head = plain_output_head(model)
        if head is not None:
            with head_inputs(head) as captured:
                forward_logits(model, batch, task)
            # (batch, n, hidden) and (batch, n): position t predicts token t+1
            hidden, labels = _next_token_pairs(captured[-1], batch["labels"])
            return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels.reshape(-1))
    return token_loss_sum(forward_logits(model, batch, task), batch["labels"], task)


def token_loss_sum(logits: Tensor, labels: Tensor, task: str) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and the number of scored targets.

    Args:
        logits: (batch, seq, vocab) for language models, (batch, classes) for ``seq-cls``. A causal
            model may return more positions than ``labels`` has (virtual tokens prepended by prompt
            tuning: the last ``seq`` are used) or fewer (``logits_to_keep``: they are the last ones,
            and must cover every scored position).
        labels: (batch, seq) with -100 where nothing is scored, or (batch,) class indices.
        task: ``causal-lm`` (position t predicts token t+1), ``seq2seq-lm`` or ``seq-cls``.

    Returns:
        ``(loss_sum, count)``: 0-dim tensors; ``loss_sum / count`` is the mean.
    """
    logits = logits.float()
    if task == "causal-lm":
        logits, labels = _next_token_pairs(logits, labels)
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (rows, vocab)
    flat_labels = labels.reshape(-1)  # (rows,)
    loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (flat_labels != IGNORE_INDEX).sum()


def _next_token_pairs(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Line up a causal model's per-position outputs with the tokens they predict.

    Args:
        scores: (batch, positions, d): logits or the head's input, for the last ``positions``
            positions (more than ``seq`` with soft prompts in front, fewer with ``logits_to_keep``).
        labels: (batch, seq).

    Returns:
        ``(scores, labels)``, (batch, kept - 1, d) and (batch, kept - 1): position t predicts token t+1.
    """
    seq = labels.shape[1]
    kept = min(scores.shape[1], seq)
    return scores[:, -kept:][:, :-1], labels[:, seq - kept + 1 :]


def forward_logits(model: nn.Module, batch: Mapping[str, Tensor], task: str) -> Tensor:
    """The model's logits for a collated batch (teacher forcing; no KV cache).

    A causal model whose forward takes ``logits_to_keep`` computes the output head only from the
    position before the batch's first answer token on: prompts are often most of a row (a dialogue
    and its summary), and the vocabulary-sized logits are the largest tensors of a step. A packed batch
    (``cu_seq_lens`` given) runs under :func:`~peftkit.objectives.packed.packed_attention`.

    Returns:
        (batch, positions, vocab) for language models (see :func:`token_loss_sum` for ``positions``),
        (batch, classes) for ``seq-cls``.
    """
    if "cu_seq_lens" in batch:
        with packed_attention(model):
            return model(**packed_inputs(batch)).logits
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if task == "seq2seq-lm":
        inputs["labels"] = batch["labels"]  # the model shifts them into its decoder inputs
    if task != "seq-cls":
        inputs["use_cache"] = False
    if task == "causal-lm" and takes_logits_to_keep(model):
        scored = (batch["labels"] != IGNORE_INDEX).any(dim=0).nonzero()  # positions with a target
        if len(scored) > 0:
            inputs["logits_to_keep"] = batch["labels"].shape[1] - int(scored[0]) + 1
    return model(**inputs).logits


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the (wrapped) model's forward accepts transformers' ``logits_to_keep``."""
    return "logits_to_keep" in inspect.signature(inner_model(model).forward).parameters


@contextmanager
def head_inputs(head: nn.Linear) -> Iterator[list[Tensor]]:
    """Within the block ``head`` computes nothing: each call appends its input to the yielded list and
    returns an empty ``(..., 0)`` tensor, so no logits are made. Its own ``forward`` comes back after.

    Args:
        head: a model's output head (see :func:`peftkit.ops.plain_output_head`); its input is
            (batch, seq, hidden).
    """
    captured: list[Tensor] = []

    def keep_input(hidden: Tensor) -> Tensor:  # (batch, seq, hidden) -> (batch, seq, 0): no logits
        captured.append(hidden)
        return hidden.new_empty((*hidden.shape[:-1], 0))

    head.forward = keep_input
    try:
        yield captured
    finally:
        del head.forward


@contextmanager
def fused_model_loss(model: nn.Module) -> Iterator[bool]:
    """Within the block, ``model(..., labels=...)`` computes its loss with the fused head; yields
    whether it does (False: the model is left as it is).

    The loss is what the model's ``loss_function`` (``ForCausalLMLoss``) would give: labels shifted by
    one, ``ignore_index`` skipped, summed and divided by ``num_items_in_batch`` when given, else
    averaged. The outputs carry no logits (``(batch, seq, 0)``): this is for training steps, where only
    the loss is read. Where the fused head cannot stand in (an adapted, biased or scaled head; a loss
    other than ``ForCausalLM``; a head input that does not line up with the labels) the model runs as
    it is.

    Args:
        model: a transformers causal LM, or a wrapper of one (a ``PeftModel``, DDP's ``module``).
    """
    base = _causal_lm(model)
    head = plain_output_head(base) if base is not None and fused_cross_entropy_enabled() else None
    if head is None:
        yield False
        return
    own_loss = base.loss_function
    had_own = "_loss_function" in vars(base)
    with head_inputs(head) as captured:
        base.loss_function = _fused_causal_lm_loss(captured, head, own_loss)
        try:
            yield True
        finally:
            if had_own:
                base.loss_function = own_loss
            else:
                del base._loss_function


def _fused_causal_lm_loss(captured: list[Tensor], head: nn.Linear, own_loss: Any) -> Any:
    """A ``loss_function`` with ``ForCausalLMLoss``'s signature that reads the head's captured input."""

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

    return loss


def _causal_lm(model: nn.Module) -> Any:
    """The transformers causal LM inside ``model`` whose loss goes through ``loss_function``, or None."""
    base = inner_model(model)
    loss_type = getattr(base, "loss_type", None)
    if not hasattr(type(base), "loss_function") or loss_type not in (None, "ForCausalLM"):
        return None
    return base
