"""TRL's ``SFTTrainer`` for peftkit models: adapters saved and resumed, the fused head on the base model.

TRL computes the loss with a fused LM head that it patches onto the model's ``forward``: onto the base
model for Hugging Face PEFT's ``PeftModel``, onto the model itself otherwise. Patched onto a peftkit
``PeftModel`` it would call the base model's backbone directly and skip ``PeftModel.forward``, where soft
prompts add their virtual tokens; :class:`SFTTrainer` moves it onto the base model, as TRL does for
Hugging Face PEFT, so the wrapper's ``forward`` runs first and hands the head its inputs.
"""

from __future__ import annotations

from typing import Any

import trl
from trl.trainer import add_fused_lm_head

from peftkit.integrations.trainer import AdapterCheckpoints
from peftkit.model import PeftModel

__all__ = ["SFTTrainer"]

# The per-token outputs trl.SFTTrainer asks its fused head for (trl 1.16, SFTTrainer.__init__): the
# loss, and the entropy and top-1 accuracy it logs.
SFT_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


class SFTTrainer(AdapterCheckpoints, trl.SFTTrainer):
    """``trl.SFTTrainer`` for a peftkit model: pass it as ``model`` (with no ``peft_config``).

    The same arguments as TRL's; checkpoints and ``save_model()`` hold adapter directories and
    ``resume_from_checkpoint`` restores them (see :class:`~peftkit.integrations.trainer.AdapterCheckpoints`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self.model
        if isinstance(model, PeftModel) and "forward" in vars(model):  # TRL's head, set on the wrapper
            del model.forward
            add_fused_lm_head(model.get_base_model(), outputs=SFT_FUSED_OUTPUTS)
