"""A warning for the one caller that saves a wrapped model wrongly without a word: ``transformers.Trainer``.

Trainer saves a model it does not know (not ``PreTrainedModel``, not Hugging Face PEFT's ``PeftModel``) as
its whole ``state_dict()`` in ``model.safetensors``: the base weights included, in every checkpoint and in
``save_model()``. It cannot be taught otherwise from outside (docs/design.md, "transformers Trainer and
TRL": a callback runs after the weights are written, and ``save_model()`` calls none), so
``peftkit.integrations.Trainer`` overrides its saving; a plain Trainer gets this warning instead, once.
"""

from __future__ import annotations

import sys
import warnings

__all__ = ["warn_if_plain_trainer_saves"]

_warned = False


def warn_if_plain_trainer_saves(depth: int = 2) -> None:
    """Warn, once per process, when the caller ``depth`` frames up is transformers' ``Trainer._save``."""
    global _warned
    if _warned:
        return
    caller = sys._getframe(depth)
    module = caller.f_globals.get("__name__", "")
    if caller.f_code.co_name != "_save" or not module.startswith("transformers."):
        return
    _warned = True
    warnings.warn(
        "transformers.Trainer is saving this peftkit model as a whole model (model.safetensors with the "
        "base weights) because it does not know peftkit's class; use peftkit.integrations.Trainer (or "
        "SFTTrainer), the same class with the same arguments, whose checkpoints and save_model() hold the "
        "adapter alone in Hugging Face PEFT's layout and resume exactly",
        UserWarning,
        stacklevel=depth + 1,
    )
