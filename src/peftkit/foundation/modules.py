"""Facts about module types that every floor needs (and so none of them should own)."""

from __future__ import annotations

from torch import nn

__all__ = ["is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2): a linear layer storing W as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")
