"""What a training step minimises, shared by ``peftkit train`` and ``peftkit.integrations``.

An :class:`Objective` is a function of the model and a collated batch returning ``(loss_sum, count)``.
``peftkit train`` divides the sum by the global batch's count, known from the data before the step (each
row's ``targets``), so that accumulation and processes split a batch without changing its gradient.

- :mod:`~peftkit.objectives.tokens`: the token cross-entropy (``token_objective``), through the fused
  head where it applies, and ``fused_model_loss`` for a model's own loss in other trainers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from torch import Tensor, nn

__all__ = ["Objective"]


class Objective(Protocol):
    """A training objective: ``objective(model, batch) -> (loss_sum, count)``.

    ``batch`` is a collated batch (``input_ids``, ``attention_mask``, ``labels``: (batch, seq)); both
    results are 0-dim tensors, ``loss_sum`` differentiable. The loop back-propagates
    ``loss_sum / global count``.
    """

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]: ...
