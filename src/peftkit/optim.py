"""Optimizer helpers. LoRA+: B factors learn faster than A factors.

Hayou, Ghosh and Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models" (2024), arXiv:2402.12354.
With A and B at the same learning rate, feature learning is inefficient at large width; LoRA+ gives B
the learning rate ``lr · loraplus_lr_ratio`` (16 is the paper's usual choice) and A the base ``lr``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.methods.lora import LoraEmbedding


def lora_plus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in LoRA+ groups, each named by its ``"name"`` key.

    - ``"lora_B"``: the B factors of LoRA adapters on Linear / Conv1D / Conv layers (DoRA and PiSSA
      included), at ``lr · loraplus_lr_ratio``;
    - ``"embedding"``: both factors of LoRA adapters on embeddings, at ``loraplus_lr_embedding`` (as
      the LoRA+ reference code and Hugging Face PEFT do);
    - ``"other"``: every other trainable parameter (A factors, DoRA magnitudes, other methods'
      parameters, trained biases, ``modules_to_save`` copies), at ``lr``.

    Groups whose parameters are all one-dimensional or less (biases, norms, magnitudes) get a
    ``"_no_decay"`` twin with ``weight_decay=0``; the others use the optimizer's weight decay.
    Empty groups are left out.

    Raises:
        ValueError: ``loraplus_lr_ratio`` below 1, or the model has no trainable LoRA B factor.
    """
    if loraplus_lr_ratio < 1:
        raise ValueError(
            f"loraplus_lr_ratio={loraplus_lr_ratio!r} must be at least 1 (B learns faster than A)"
        )
    kinds: dict[int, str] = {}
    for module in model.modules():
        if not isinstance(module, AdapterLayer):
            continue
        for adapter in module.adapters.values():
            if isinstance(adapter, LoraEmbedding):
                kinds.update((id(p), "embedding") for p in adapter.parameters())
            elif isinstance(getattr(adapter, "lora_B", None), nn.Module):
                kinds.update((id(p), "lora_B") for p in adapter.lora_B.parameters())
    rates = {"lora_B": lr * loraplus_lr_ratio, "embedding": loraplus_lr_embedding, "other": lr}
    grouped: dict[str, list[nn.Parameter]] = {}
    for param in (p for p in model.parameters() if p.requires_grad):
        kind = kinds.get(id(param), "other")
        grouped.setdefault(kind if param.dim() > 1 else f"{kind}_no_decay", []).append(param)
    if not grouped.get("lora_B"):
        raise ValueError(
            "the model has no trainable LoRA B factor: LoRA+ only changes the learning rate of LoRA's B; "
            "wrap with a LoraConfig (or use a plain optimizer)"
        )
    groups = []
    for name, params in grouped.items():
        kind = name.removesuffix("_no_decay")
        group: dict[str, Any] = {"name": name, "params": params, "lr": rates[kind]}
        if name.endswith("_no_decay"):
            group["weight_decay"] = 0.0
        groups.append(group)
    return groups


def lora_plus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s trainable parameters with LoRA+ learning rates.

    Args:
        model: a :class:`peftkit.PeftModel` (or any module holding peftkit LoRA adapters).
        optimizer_cls: the optimizer class; it must accept parameter groups.
        lr: the learning rate of A factors and of every other trainable parameter.
        loraplus_lr_ratio: B's learning rate over A's (≥ 1).
        loraplus_lr_embedding: the learning rate of LoRA adapters on embeddings.
        kwargs: passed to ``optimizer_cls`` (``weight_decay``, ``betas``…).

    Raises:
        ValueError: see :func:`lora_plus_param_groups`.
    """
    groups = lora_plus_param_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding)
    return optimizer_cls(groups, lr=lr, **kwargs)
