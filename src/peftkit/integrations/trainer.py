"""``transformers.Trainer`` saving and resuming a peftkit model as adapter directories.

Trainer decides what a checkpoint holds by the model's class: it calls ``save_pretrained`` only on a
``PreTrainedModel`` or Hugging Face PEFT's ``PeftModel`` and otherwise writes the whole ``state_dict``
as ``model.safetensors`` (which fails outright on tied embeddings), and it resumes adapters only for
those classes. A ``TrainerCallback`` cannot change that: the weights are written before ``on_save``
runs, ``save_model()`` calls no callback, and ``resume_from_checkpoint`` loads the weights before
training (and any callback) begins. So :class:`AdapterCheckpoints` overrides the three methods that
write and read the weights (``_save``, ``_load_from_checkpoint``, ``_load_best_model``) and leaves
any other model to Trainer. Everything else a checkpoint holds (optimizer, scheduler, random states,
``trainer_state.json``) is Trainer's own and restored by it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from peftkit.foundation.io import CONFIG_NAME
from peftkit.model import DEFAULT_ADAPTER_NAME, PeftModel
from peftkit.objectives.tokens import fused_model_loss

__all__ = ["AdapterCheckpoints", "FusedLoss", "Trainer", "load_saved_adapters"]

TRAINING_ARGS_NAME = "training_args.bin"  # Trainer writes its arguments next to every saved model


class AdapterCheckpoints:
    """Mixed into a ``transformers.Trainer`` subclass (listed before it): a peftkit model is saved,
    resumed and reloaded as adapters.

    With a :class:`~peftkit.model.PeftModel`, ``trainer.save_model(dir)`` and every
    ``checkpoint-<step>/`` hold what ``model.save_pretrained`` writes (``adapter_config.json`` and
    ``adapter_model.safetensors``, Hugging Face PEFT's layout; adapters other than ``"default"`` in
    subdirectories), plus the tokenizer and ``training_args.bin`` as Trainer writes them;
    ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` write the saved values back
    into the model's adapters in place (:func:`load_saved_adapters`). Any other model is Trainer's business.

    One process or DDP: each process holds the whole model. FSDP and DeepSpeed are refused.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.model, PeftModel) and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise ValueError(
                f"{type(self).__name__} saves a peftkit model's adapters from the copy of the model each "
                "process holds, which FSDP and DeepSpeed shard; train on one device or with DDP "
                "(torchrun without an FSDP/DeepSpeed config)"
            )

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        if not isinstance(self.model, PeftModel):
            super()._save(output_dir, state_dict)
            return
        if not self.args.should_save:  # another DDP process: the main one writes
            return
        directory = Path(output_dir if output_dir is not None else self.args.output_dir)
        self.model.save_pretrained(directory)
        processor = self.processing_class
        if processor is None:  # as Trainer: else the data collator's tokenizer, if it has one
            processor = getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(directory)
        torch.save(self.args, directory / TRAINING_ARGS_NAME)  # Trainer's record of the run, as it writes it

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.model if model is None else self.accelerator.unwrap_model(model)
        if not isinstance(target, PeftModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_saved_adapters(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if not isinstance(self.model, PeftModel):
            super()._load_best_model()
            return
        load_saved_adapters(self.model, self.state.best_model_checkpoint)


class FusedLoss:
    """Mixed into a ``transformers.Trainer`` subclass (listed before it): a training step of a causal LM
    computes the model's own loss through the fused head
    (:func:`peftkit.objectives.tokens.fused_model_loss`): the same value and gradients, without
    the vocabulary-sized logits (for SmolLM2 at 4 x 256 tokens, ~200 MB each, several of them).
    Evaluation and prediction, label smoothing and a ``compute_loss_func`` keep Trainer's own path
    (they read the logits). Off with ``peftkit.ops.fused_cross_entropy(False)`` or ``PEFTKIT_FUSED_CE=0``.
    """

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        plain = self.label_smoother is None and self.compute_loss_func is None and "labels" in inputs
        if return_outputs or not plain or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with fused_model_loss(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class Trainer(AdapterCheckpoints, FusedLoss, transformers.Trainer):
    """``transformers.Trainer`` that saves and resumes a peftkit model as adapters (see
    :class:`AdapterCheckpoints`) and trains causal LMs with the fused head's loss (see
    :class:`FusedLoss`); the same arguments, and the same behaviour for any other model."""


def load_saved_adapters(model: PeftModel, directory: str | os.PathLike[str]) -> None:
    """Write the adapters saved by ``model.save_pretrained(directory)`` back into ``model``, in place.

    Every adapter of the model must be there (``"default"`` in ``directory``, another name in
    ``directory/<name>``) and nothing else, each saved with the same config.

    Raises:
        ValueError: the saved adapters are not the model's, or one does not fit (see
            :meth:`~peftkit.model.PeftModel.load_adapter_weights`).
    """
    directory = Path(directory)
    saved = {
        DEFAULT_ADAPTER_NAME if path == directory else path.name
        for path in [directory, *directory.iterdir()]
        if (path / CONFIG_NAME).is_file()
    }
    if saved != set(model.peft_config):
        raise ValueError(
            f"{directory} holds the adapters {sorted(saved)} and this model has {sorted(model.peft_config)}; "
            "resume with the model set up as it was for that run (the same wrap / add_adapter calls)"
        )
    for name in model.peft_config:
        model.load_adapter_weights(directory if name == DEFAULT_ADAPTER_NAME else directory / name, name)
