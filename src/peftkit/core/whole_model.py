"""Model-level adapters: methods that act at the model boundary or on existing parameters.

Layer-level methods (LoRA…) wrap modules inside the base model (:mod:`peftkit.core.layer`). A model-level
method wraps nothing: soft prompts (prompt tuning, P-tuning, prefix tuning) change what goes *into* the
model (input embeddings, attention mask, labels, KV cache), and selective fine-tuning trains some of the
base model's own parameters. Each adapter is one ``nn.Module`` kept by
:class:`~peftkit.model.PeftModel` in ``model_adapters[name]``, outside the base model, and the PeftModel
calls the hooks of :class:`ModelAdapter` at the points where it already acts: adding, activating,
freezing, forward/generate, merging, saving and unloading.

A method's config is model-level when it has ``build_model_adapter`` (:class:`ModelLevelConfig`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from peftkit.core.adapter_config import AdapterConfig


@runtime_checkable
class ModelAdapter(Protocol):
    """What a model-level adapter provides. Every hook gets the base model it belongs to.

    Attributes:
        key_prefix: the prefix of this method's extra file keys in Hugging Face PEFT's files (its
            ``modules_to_save`` copies): ``"base_model."`` for prompt learning, ``"base_model.model."``
            for the other methods.
        merged: whether the adapter is folded into the base model (only selective can be).
    """

    key_prefix: str
    merged: bool

    def activate(self, model: nn.Module) -> None:
        """Make the adapter take effect (selective: write its values into the base parameters)."""

    def deactivate(self, model: nn.Module) -> None:
        """Stop it taking effect (selective: keep its values, put the original ones back)."""

    def set_trainable(self, model: nn.Module, trainable: bool) -> None:
        """Turn gradients for the adapter's parameters on or off (the base is frozen already)."""

    def prepare_inputs(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The base model's ``forward`` arguments with the adapter applied (soft prompts prepend)."""

    def prepare_generate(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The base model's ``generate`` arguments with the adapter applied."""

    def file_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """The adapter's tensors under their file keys; loading copies into these same tensors."""

    def file_config(self, config: AdapterConfig) -> AdapterConfig:
        """The config to write to ``adapter_config.json`` (a method may save in another method's format)."""

    def merge(self, model: nn.Module) -> None:
        """Fold the adapter into the base model, or raise ``NotImplementedError`` saying why it cannot."""

    def unmerge(self, model: nn.Module) -> None:
        """Undo :meth:`merge`."""

    def release(self, model: nn.Module, keep_values: bool) -> None:
        """The adapter is being removed: leave the base model as it was, or (``keep_values``) as adapted."""


@runtime_checkable
class ModelLevelConfig(Protocol):
    """A config whose method is model-level."""

    def resolve(self, model: nn.Module) -> AdapterConfig:
        """A copy with the fields left to the model (sizes, layer counts…) filled in from ``model``."""

    def build_model_adapter(self, model: nn.Module) -> nn.Module:
        """The :class:`ModelAdapter` for ``model``, initialised as the config says."""


def is_model_level(config: AdapterConfig) -> bool:
    """Whether ``config``'s method works at the model level rather than inside layers."""
    return isinstance(config, ModelLevelConfig)
