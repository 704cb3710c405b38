"""A causal LM over a packed batch: several examples in one sequence, each attending only to itself.

A packed batch (``peftkit.training.data.collate_packed``) is one row of examples laid end to end:
``input_ids`` and ``position_ids`` of shape (1, tokens), the positions restarting at 0 for every
example, and ``cu_seq_lens`` (examples + 1,), the examples' offsets. Inside :func:`packed_attention`
the model's attention layers run :func:`packed_attention_forward`: PyTorch's
``scaled_dot_product_attention`` once per example with its own causal mask (``is_causal``, no mask
tensor; a sliding-window layer's window as a mask where the example is longer), so no token sees
another example's, no block-diagonal mask is built, and no score across two examples is computed.
With the positions restarting, each example's outputs are those it has alone.

Chosen by measurement (docs/design.md, "Packing"): on this CPU it beat SDPA with transformers'
block-diagonal mask (built from restarting ``position_ids``) in time and memory, and flex attention
has no backward on the CPU in PyTorch 2.13.

The model must use transformers' attention interface (``_supports_attention_backend``), take
``position_ids`` and pass extra keyword arguments down to its attention (:func:`packing_support`
checks): Llama (SmolLM2), Mistral, Qwen2, Qwen3, Gemma 3, Phi-3 and GPT-2 do; Gemma 2 (soft-capped
attention) does not.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PACKED_ATTENTION",
    "inner_model",
    "packed_attention",
    "packed_attention_forward",
    "packed_inputs",
    "packing_support",
    "sliding_causal_mask",
]

PACKED_ATTENTION = "peftkit_packed"  # its name in transformers' AttentionInterface


def packed_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Causal attention within each example of a packed sequence (transformers' attention signature).

    Args:
        module: the attention layer (its ``num_key_value_groups`` and ``is_causal`` are read).
        query: (1, heads, tokens, head_dim).
        key, value: (1, kv_heads, tokens, head_dim).
        attention_mask: must be None: a packed sequence has no padding.
        cu_seq_lens_q: (examples + 1,) int offsets of the examples, from 0 to ``tokens``.

    Returns:
        ``(output, None)``, output (1, tokens, heads, head_dim).

    Raises:
        ValueError: no ``cu_seq_lens_q`` (not a packed batch), a mask, or more than one row.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or attention_mask is not None or query.shape[0] != 1:
        raise ValueError(
            "packed attention takes one packed row with cu_seq_lens_q and no attention mask "
            f"(got {query.shape[0]} rows, cu_seq_lens_q {'missing' if cu_seq_lens_q is None else 'given'}, "
            f"mask {'given' if attention_mask is not None else 'none'})"
        )
    window = kwargs.get("sliding_window")
    outputs = []
    for start, end in itertools.pairwise(cu_seq_lens_q.tolist()):
        mask = sliding_causal_mask(end - start, window, query.device)
        output, _ = sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=mask is None,
        )
        outputs.append(output)  # (1, end - start, heads, head_dim)
    return torch.cat(outputs, dim=1), None


def sliding_causal_mask(tokens: int, window: int | None, device: torch.device) -> Tensor | None:
    """The boolean (1, 1, tokens, tokens) mask of a sliding-window layer (token i sees tokens i - window
    + 1 to i, as transformers' ``sliding_window_overlay``), or None where plain causal attention is the
    same (no window, or an example no longer than it)."""
    if window is None or tokens <= window:
        return None
    positions = torch.arange(tokens, device=device)
    distance = positions[:, None] - positions[None, :]  # (tokens, tokens) query minus key
    return ((distance >= 0) & (distance < window))[None, None]


@contextmanager
def packed_attention(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s attention layers run :func:`packed_attention_forward`.

    Hold it over the forward *and* the backward of a packed batch: with gradient checkpointing the
    backward runs the layers' forward again. Nested blocks are fine; the model's own attention comes
    back at the end.

    Raises:
        ValueError: the model cannot run packed batches (:func:`packing_support` says why).
    """
    reason = packing_support(model)
    if reason is not None:
        raise ValueError(reason)
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    config = inner_model(model).config
    previous = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def packed_inputs(batch: Mapping[str, Tensor]) -> dict[str, Any]:
    """The keyword arguments of a model call on a packed batch: ids, positions and the offsets, under
    the names transformers passes to its attention functions (no attention mask, no cache)."""
    offsets = batch["cu_seq_lens"]
    return {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "cu_seq_lens_q": offsets,
        "cu_seq_lens_k": offsets,
        "use_cache": False,
    }


def packing_support(model: nn.Module) -> str | None:
    """Why ``model`` cannot run packed batches, or None when it can.

    It can when it is one of transformers' causal LMs (``AutoModelForCausalLM``'s classes) that uses
    the attention interface, has no sub-models with configs of their own, takes ``position_ids`` and
    passes other keyword arguments on, and runs ``sdpa`` or ``eager`` attention without soft-capping
    (Gemma 2 soft-caps; sliding windows are kept), with no soft prompt
    (virtual tokens or prefixes go in front of a row, not of each example in it).
    """
    from peftkit.methods.soft_prompt import SoftPromptAdapter

    if any(isinstance(module, SoftPromptAdapter) for module in model.modules()):
        return "a soft prompt puts virtual tokens in front of each row, not of each example"
    inner = inner_model(model)
    config = getattr(inner, "config", None)
    name = type(inner).__name__
    if config is None or not _is_causal_lm(inner) or getattr(config, "sub_configs", None):
        return f"{name} is not a decoder-only language model"
    if not getattr(type(inner), "_supports_attention_backend", False):
        return f"{name} does not use transformers' attention interface"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return f"{name} soft-caps its attention scores, which SDPA cannot (packing needs plain attention)"
    if config._attn_implementation not in ("sdpa", "eager", PACKED_ATTENTION):
        return f"{name} runs {config._attn_implementation!r} attention (packing needs sdpa or eager)"
    parameters = inspect.signature(inner.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "position_ids" not in parameters or not takes_kwargs:
        return f"{name}.forward takes no position_ids or no attention keyword arguments"
    return None


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is one of transformers' causal language models (an encoder, an
    encoder-decoder or a classifier is not)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def inner_model(model: nn.Module) -> Any:
    """The model inside DDP-style wrappers (``.module``) and a ``PeftModel`` (``get_base_model()``)."""
    while hasattr(model, "module"):  # DistributedDataParallel and similar wrappers
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
