"""The method table: every method peftkit has, one :class:`Method` entry each.

A method is its config class (a frozen dataclass in its own file or package under ``methods/``, whose
``build_adapter`` or ``build_model_adapter`` makes the adapter) plus one entry in :data:`METHOD_TABLE`.
Everything else is derived from the table:

- :func:`config_classes`, ``peft_type`` → config class, which ``load`` uses to read ``adapter_config.json``;
- ``peftkit train --method NAME`` and its defaults (:mod:`peftkit.training.method_choice`);
- ``peftkit compare``'s presets of the same names (:mod:`peftkit.compare.plan`).

``tests/methods/test_registry.py`` checks that every entry is reachable from the package root, the
command line and compare. A row names its config class by import path and imports it on first use, so
reading the table (``peftkit --help`` lists the method names) does not import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftkit.core.adapter_config import AdapterConfig

__all__ = ["METHOD_TABLE", "Method", "config_classes", "method_by_name"]


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    Attributes:
        name: ``--method NAME`` and the compare preset of that name.
        config: the config class that builds the method, as ``"module:Class"``
            (:attr:`config_class` imports it).
        family: ``"selective"``, ``"reparameterization"`` or ``"additive"``.
        defaults: options ``peftkit train`` uses unless the user sets them (the class's own defaults are
            Hugging Face PEFT's; these are what a first run should train).
        fixed: options that make this entry a variant of its class (DoRA: ``use_dora=True``); not
            settable by the user under this name.
        lr: a learning rate that works for short runs of this method (compare's preset uses it).

    No entry sets ``target_modules``: unset, each method's config takes the model's own default
    (:mod:`peftkit.methods.default_targets`: the attention projections for LoRA, DoRA and selective
    fine-tuning; keys, values and the feed-forward output for IA³; bottleneck adapters' own placement).
    """

    name: str
    config: str
    family: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    lr: float = 1e-3

    @property
    def config_class(self) -> type[AdapterConfig]:
        """The config class, imported on first use."""
        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(module), name)

    def options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The user's ``given`` options over this method's defaults (``fixed`` not included)."""
        return {**self.defaults, **given}


_LORA_DEFAULTS = {"r": 8, "lora_alpha": 16}
_VIRTUAL_TOKENS = {"num_virtual_tokens": 20}

# Learning rates are the usual starting points for short runs of each family (soft prompts need ~30x
# more than LoRA; full fine-tuning, which is not a method config, ~20x less).
METHOD_TABLE: tuple[Method, ...] = (
    Method("lora", "peftkit.methods.lora.config:LoraConfig", "reparameterization", _LORA_DEFAULTS, lr=1e-3),
    Method(
        "dora",
        "peftkit.methods.lora.config:LoraConfig",
        "reparameterization",
        _LORA_DEFAULTS,
        fixed={"use_dora": True},
        lr=1e-3,
    ),
    Method("ia3", "peftkit.methods.ia3:IA3Config", "reparameterization", lr=1e-2),
    Method("adapter", "peftkit.methods.bottleneck:BottleneckConfig", "additive", lr=1e-3),
    Method(
        "prompt", "peftkit.methods.prompt_tuning:PromptTuningConfig", "additive", _VIRTUAL_TOKENS, lr=3e-2
    ),
    Method("p-tuning", "peftkit.methods.p_tuning:PromptEncoderConfig", "additive", _VIRTUAL_TOKENS, lr=1e-3),
    Method(
        "prefix", "peftkit.methods.prefix_tuning:PrefixTuningConfig", "additive", _VIRTUAL_TOKENS, lr=1e-2
    ),
    Method("selective", "peftkit.methods.selective:SelectiveConfig", "selective", lr=1e-3),
    Method("ln-tuning", "peftkit.methods.selective:LNTuningConfig", "selective", lr=1e-3),
)


def config_classes() -> dict[str, type[AdapterConfig]]:
    """``peft_type`` (as in ``adapter_config.json``) → config class, for every method of the table."""
    classes = (entry.config_class for entry in METHOD_TABLE)
    return {cls.peft_type: cls for cls in classes}


def method_by_name(name: str) -> Method | None:
    """The table entry named ``name``, or None."""
    return next((entry for entry in METHOD_TABLE if entry.name == name), None)
