"""What a training run returns: :class:`TrainResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.training.data import PreparedData

__all__ = ["TrainResult"]


@dataclass
class TrainResult:
    """What a run did. ``losses[i]`` is the training loss of step ``first_step + i + 1``."""

    output_dir: Path
    steps: int
    first_step: int
    losses: list[float]
    metric: str
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    trainable: int = 0
    total: int = 0
    tokens_per_s: float = 0.0  # real (not padding) tokens per second of training
    tokens: int = 0  # real tokens trained on
    padding_tokens: int = 0  # padding tokens computed alongside them
    wall_time_s: float = 0.0  # since step 0: the sessions a --resume continued included, as train_time_s
    peak_memory_bytes: int = 0
    stopped: str | None = None  # None (finished), "interrupted" or "non-finite"
    checkpoint: Path | None = None
    model: nn.Module | None = field(default=None, repr=False)  # the trained model (unwrapped)
    tokenizer: Any = field(default=None, repr=False)
    train_time_s: float = 0.0  # time spent in optimizer steps (no evaluation, no saving), since step 0
    sessions: int = 1  # processes that ran it: 1, plus one per --resume
    data: PreparedData | None = field(default=None, repr=False)  # the tokenized rows it trained on
