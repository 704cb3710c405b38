"""TRL's ``SFTTrainer`` and ``DPOTrainer`` for peftkit models: adapters saved and resumed, the fused head on
the base model, and DPO's reference without a second model.

TRL computes the loss with a fused LM head that it patches onto the model's ``forward``: onto the base
model for Hugging Face PEFT's ``PeftModel``, onto the model itself otherwise. Patched onto a peftkit
``PeftModel`` it would call the base model's backbone directly and skip ``PeftModel.forward``, where soft
prompts add their virtual tokens; both trainers move it onto the base model, as TRL does for Hugging
Face PEFT, so the wrapper's ``forward`` runs first and hands the head its inputs.

TRL recognises only Hugging Face PEFT's models as adapters, so for any other model ``DPOTrainer`` would
load a second copy of the base model as its reference. :class:`DPOTrainer` gives it a
:class:`ReferencePolicy` instead: the same model with only its frozen adapter ``"ref"`` active, a copy
of the adapter it starts from, as TRL makes for a Hugging Face PEFT model it is given (for a fresh LoRA
adapter that is the base model); or, with ``ReferencePolicy(model)`` passed as ``ref_model`` and no
``"ref"`` adapter, the model with its adapters off.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trl
from torch import nn
from trl.trainer import add_fused_lm_head

from peftkit.integrations.trainer import AdapterCheckpoints
from peftkit.model import PeftModel

__all__ = ["DPOTrainer", "ReferencePolicy", "SFTTrainer"]

# The per-token outputs trl.SFTTrainer asks its fused head for (trl 1.16, SFTTrainer.__init__): the
# loss, and the entropy and top-1 accuracy it logs.
SFT_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")
# trl.DPOTrainer's (trl 1.16, DPOTrainer.__init__), and the WPO weights' with use_weighting
DPO_FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
REFERENCE_ADAPTER = "ref"  # TRL's name for a frozen copy of the starting adapter


def _move_fused_head(model: nn.Module, outputs: tuple[str, ...]) -> None:
    """TRL's fused head, patched onto a peftkit ``PeftModel``, goes onto its base model instead."""
    if isinstance(model, PeftModel) and "forward" in vars(model):
        del model.forward
        add_fused_lm_head(model.get_base_model(), outputs=outputs)


class SFTTrainer(AdapterCheckpoints, trl.SFTTrainer):
    """``trl.SFTTrainer`` for a peftkit model: pass it as ``model`` (with no ``peft_config``).

    The same arguments as TRL's; checkpoints and ``save_model()`` hold adapter directories and
    ``resume_from_checkpoint`` restores them (see :class:`~peftkit.integrations.trainer.AdapterCheckpoints`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _move_fused_head(self.model, SFT_FUSED_OUTPUTS)


class ReferencePolicy(nn.Module):
    """DPO's reference as a view of the policy: calling it runs ``policy`` with only its ``"ref"`` adapter
    when it has one, else with its adapters off. It holds no parameters of its own.

    Args:
        policy: the peftkit model being trained.
    """

    def __init__(self, policy: PeftModel) -> None:
        super().__init__()
        self.__dict__["policy"] = policy  # not a submodule: its parameters stay the policy's

    @property
    def config(self) -> Any:
        """The policy's model config (TRL reads it)."""
        return self.policy.config

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the policy computes the reference."""
        policy = self.policy
        if REFERENCE_ADAPTER not in policy.peft_config:
            with policy.disable_adapters():
                yield
            return
        previous = policy.active_adapters
        policy.set_adapter(REFERENCE_ADAPTER)
        try:
            yield
        finally:
            policy.set_adapter(previous)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.active():
            return self.policy(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The policy's, so that TRL's cache of precomputed reference log-probs is keyed on its weights."""
        return self.policy.state_dict(*args, **kwargs)


def add_reference_copy(model: PeftModel) -> None:
    """Add ``"ref"``: a frozen copy of the model's one active adapter, saved and loaded back (so every
    method's files say what it is)."""
    active = model.active_adapters
    if len(active) != 1:
        raise ValueError(f"DPOTrainer trains one adapter; the model has {active} active: set_adapter one")
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory, selected_adapters=active)
        saved = directory if active[0] == "default" else f"{directory}/{active[0]}"
        model.load_adapter(saved, adapter_name=REFERENCE_ADAPTER)


class DPOTrainer(AdapterCheckpoints, trl.DPOTrainer):
    """``trl.DPOTrainer`` for a peftkit model: pass it as ``model`` (with no ``peft_config``).

    The same arguments as TRL's. Without ``ref_model`` the reference is a frozen copy of the adapter the
    model starts with (added as ``"ref"`` unless the model has one: TRL's way for Hugging Face PEFT),
    computed by the same model (:class:`ReferencePolicy`): no second model is loaded. Checkpoints hold
    adapter directories (see :class:`~peftkit.integrations.trainer.AdapterCheckpoints`).
    """

    def __init__(self, model: Any = None, ref_model: Any = None, *args: Any, **kwargs: Any) -> None:
        view = None
        if isinstance(model, PeftModel) and ref_model is None:
            if REFERENCE_ADAPTER not in model.peft_config:
                add_reference_copy(model)
            view = ReferencePolicy(model)
        elif isinstance(ref_model, ReferencePolicy):
            view = ref_model
        super().__init__(model, view if view is not None else ref_model, *args, **kwargs)
        self._own_heads()

    def _own_heads(self) -> None:
        """TRL's fused head from the peftkit model onto its base model, and off the reference view (which
        calls the model). Done after TRL's ``__init__`` patched them, and before its reference pass."""
        _move_fused_head(
            self.model, DPO_FUSED_OUTPUTS + (("log_sum_sq_probs",) if self.use_weighting else ())
        )
        view = self.ref_model
        if isinstance(view, ReferencePolicy) and "forward" in vars(view):
            del view.forward

    def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:
        self._own_heads()  # TRL's __init__ computes them before it returns
        return super()._precompute_ref_logps(*args, **kwargs)
