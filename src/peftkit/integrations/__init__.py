"""peftkit models in other tools' trainers: ``Trainer`` (transformers), ``SFTTrainer``, ``DPOTrainer`` (TRL).

Each is the tool's own class with :class:`~peftkit.integrations.trainer.AdapterCheckpoints` mixed in,
so checkpoints and ``save_model()`` hold adapter directories and ``resume_from_checkpoint`` restores
them; ``Trainer`` also computes a causal LM's loss with the fused head
(:class:`~peftkit.integrations.trainer.FusedLoss`); ``DPOTrainer``'s reference is the model with its
adapters off (:class:`~peftkit.integrations.trl.ReferencePolicy`), not a second model. The names are
imported on first use: ``import peftkit.integrations`` loads neither transformers nor TRL, and the TRL
trainers need TRL installed only when they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "AdapterCheckpoints": "peftkit.integrations.trainer",
    "FusedLoss": "peftkit.integrations.trainer",
    "Trainer": "peftkit.integrations.trainer",
    "load_saved_adapters": "peftkit.integrations.trainer",
    "SFTTrainer": "peftkit.integrations.trl",
    "DPOTrainer": "peftkit.integrations.trl",
    "ReferencePolicy": "peftkit.integrations.trl",
}

__all__ = [
    "AdapterCheckpoints",
    "DPOTrainer",
    "FusedLoss",
    "ReferencePolicy",
    "SFTTrainer",
    "Trainer",
    "load_saved_adapters",
]

if TYPE_CHECKING:
    from peftkit.integrations.trainer import AdapterCheckpoints, FusedLoss, Trainer, load_saved_adapters
    from peftkit.integrations.trl import DPOTrainer, ReferencePolicy, SFTTrainer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'peftkit.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
