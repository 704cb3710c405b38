"""Per-sequence log-probabilities of answers, through the fused head: what preference losses read.

:func:`sequence_log_probs` runs the model on a batch of pairs (:func:`~peftkit.objectives.pair_batch.
collate_pairs`) and sums ``log p(token | before)`` over each answer. Where the output head is a plain
``nn.Linear`` (as for the token loss, :func:`peftkit.ops.plain_output_head`) the head's forward is
swapped for a stub that keeps its input (:func:`~peftkit.objectives.tokens.head_inputs`), and only the
answer tokens' log-probabilities are computed, chunk by chunk (:func:`peftkit.ops.linear_log_probs`):
no vocabulary-sized logits of the batch exist, and prompt tokens cost no head at all. Otherwise the
model's logits are read at the answer positions.

Pairs share their prompt in one row (``prompt | chosen | rejected``) where the model takes a custom
4-D attention mask and position ids (:func:`shares_prompts`); else they take two rows.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.objectives.pair_batch import pair_attention_mask
from peftkit.objectives.tokens import head_inputs, inner_model
from peftkit.ops import fused_cross_entropy_enabled, linear_log_probs, plain_output_head

__all__ = ["pair_model_inputs", "sequence_log_probs", "shares_prompts"]

MASKABLE_ATTENTION = ("sdpa", "eager")  # implementations that read a custom 4-D mask as given


def shares_prompts(model: nn.Module) -> bool:
    """Whether pairs can share their prompt in one row on ``model``.

    Needs a decoder whose attention reads a 4-D mask as given (``sdpa`` or ``eager``), full attention in
    every layer (no sliding window: the custom mask would replace it), a forward taking
    ``position_ids``, and no active soft prompt or other whole-model adapter (they lengthen the rows).
    """
    base = inner_model(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in MASKABLE_ATTENTION:
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return False
    while hasattr(model, "module"):  # DistributedDataParallel and similar wrappers
        model = model.module
    whole_model = getattr(model, "model_adapters", None)  # a peftkit PeftModel's soft prompts, selective…
    if whole_model is None:
        return True
    return not any(name in whole_model for name in model.active_adapters)


def pair_model_inputs(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Any]:
    """The keyword arguments of the model's forward for a batch of pairs (either layout)."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "segments" not in batch:
        inputs["attention_mask"] = batch["attention_mask"]
        return inputs
    config = inner_model(model).config
    additive = None
    if config._attn_implementation != "sdpa":  # eager attention adds the mask to its scores
        additive = inner_model(model).get_input_embeddings().weight.dtype
    inputs["attention_mask"] = pair_attention_mask(batch["segments"], additive)
    inputs["position_ids"] = batch["position_ids"]
    return inputs


def sequence_log_probs(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Each answer's summed log-probability under ``model``, and its token count.

    Args:
        batch: from :func:`~peftkit.objectives.pair_batch.collate_pairs` (on the model's device).

    Returns:
        ``(sums, counts)``: (2 · pairs,) each, the chosen answers first; ``sums`` float32 and
        differentiable.
    """
    inputs = pair_model_inputs(model, batch)
    width = batch["input_ids"].shape[1]
    positions, tokens = batch["score_positions"], batch["score_tokens"]
    head = plain_output_head(model) if fused_cross_entropy_enabled() else None
    if head is not None:
        with head_inputs(head) as captured:
            model(**inputs)
        hidden = captured[-1][:, -width:]  # (rows, width, hidden): soft prompts' positions dropped
        scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (tokens, hidden)
        token_log_probs = linear_log_probs(scored, head.weight, tokens)
    else:
        logits = model(**inputs).logits[:, -width:]  # (rows, width, vocab)
        scored = logits.reshape(-1, logits.shape[-1]).index_select(0, positions).float()  # (tokens, vocab)
        token_log_probs = torch.log_softmax(scored, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    lengths = batch["answer_lengths"]
    sums = torch.zeros(len(lengths), dtype=torch.float32, device=token_log_probs.device)
    return sums.index_add(0, batch["score_sequences"], token_log_probs), lengths
