"""A run's optimizer and learning-rate schedule, built from its settings.

``optimizer`` (:data:`~peftkit.training.train_config.OPTIMIZERS`):

- ``adamw``: AdamW over the trainable parameters at ``lr``, ``weight_decay`` on matrices only
  (one-dimensional parameters: biases, norms, DoRA magnitudes, without);
- ``lora-plus``: AdamW over :func:`peftkit.optim.lora_plus_param_groups` (Hayou et al. 2024): LoRA's
  B factors at ``lr · loraplus_lr_ratio``, LoRA on embeddings at ``loraplus_lr_embedding``'s default,
  everything else (A factors included) at ``lr``; the same weight-decay rule. LoRA methods only.

``lr_scheduler`` (:data:`~peftkit.training.train_config.LR_SCHEDULERS`): a linear warm-up over
``warmup_steps``, then ``cosine`` or ``linear`` decay to 0 at the last step, or ``constant``
(:func:`lr_factor`). Each parameter group's rate is its own rate times that factor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peftkit.foundation.errors import UsageError
from peftkit.training.train_config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "check_optimizer", "lr_factor"]


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """The learning-rate multiplier before update ``step + 1`` (steps count from 0).

    Warm-up: ``(step + 1) / (warmup + 1)`` while ``step < warmup``; then, with
    ``progress = (step - warmup) / (total - warmup)`` (at most 1): ``cosine`` gives
    ``(1 + cos(π · progress)) / 2``, ``linear`` ``1 - progress``, ``constant`` 1.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(1, total - warmup), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def check_optimizer(config: TrainConfig, method_config: Any) -> None:
    """Refuse an optimizer the method cannot use, before the model loads (``method_config``: the
    method's config object, None for ``full``).

    Raises:
        UsageError: ``lora-plus`` with a method that is not LoRA (or DoRA).
    """
    from peftkit.methods.lora import LoraConfig

    if config.optimizer == "lora-plus" and not isinstance(method_config, LoraConfig):
        raise UsageError(
            f"optimizer lora-plus sets the learning rate of LoRA's B factors; method {config.method!r} has "
            "none: use --method lora or dora, or --optimizer adamw"
        )


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names over ``model``'s trainable parameters.

    Its first parameter group is at the base rate ``config.lr`` (what ``metrics.jsonl`` logs as ``lr``).

    Raises:
        UsageError: ``lora-plus`` on a model without a trainable LoRA B factor.
    """
    if config.optimizer == "lora-plus":
        from peftkit.optim import lora_plus_param_groups

        try:
            groups = lora_plus_param_groups(model, config.lr, config.loraplus_lr_ratio)
        except ValueError as e:
            raise UsageError(f"optimizer lora-plus: {e}") from e
        groups.sort(key=lambda group: not group["name"].startswith("other"))  # the base rate first
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=config.lr,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``config.lr_scheduler`` names, with ``config.warmup_steps`` of warm-up, over
    ``total_steps`` optimizer steps (:func:`lr_factor`)."""
    warmup, schedule = config.warmup_steps, config.lr_scheduler
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, schedule)
    )
