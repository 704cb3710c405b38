"""The method table: every method peftkit has, one :class:`Method` entry each.

A method is its config class (a frozen dataclass in its own file or package under ``methods/``, whose
``build_adapter`` or ``build_model_adapter`` makes the adapter) plus one entry in :data:`METHOD_TABLE`.
Everything else is derived from the table:

- :data:`METHODS`, ``peft_type`` → config class, which ``load`` uses to read ``adapter_config.json``;
- ``peftkit train --method NAME`` and its defaults (:mod:`peftkit.training.method_choice`);
- ``peftkit compare``'s presets of the same names (:mod:`peftkit.compare.plan`).

``tests/methods/test_registry.py`` checks that every entry is reachable from the package root, the
command line and compare.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peftkit.config import AdapterConfig
from peftkit.methods.bottleneck import BottleneckConfig, HoulsbyConfig, PfeifferConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora import LoraConfig
from peftkit.methods.p_tuning import PromptEncoderConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig
from peftkit.methods.selective import LNTuningConfig, SelectiveConfig

__all__ = [
    "ATTENTION",
    "METHODS",
    "METHOD_TABLE",
    "BottleneckConfig",
    "HoulsbyConfig",
    "IA3Config",
    "LNTuningConfig",
    "LoraConfig",
    "Method",
    "PfeifferConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
    "method_by_name",
]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # Llama-style attention projections


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    Attributes:
        name: ``--method NAME`` and the compare preset of that name.
        config_class: the config class that builds the method.
        family: ``"selective"``, ``"reparameterization"`` or ``"additive"``.
        defaults: options ``peftkit train`` uses unless the user sets them (the class's own defaults are
            Hugging Face PEFT's; these are what a first run should train).
        fixed: options that make this entry a variant of its class (DoRA: ``use_dora=True``); not
            settable by the user under this name.
        lr: a learning rate that works for short runs of this method (compare's preset uses it).
        within_targets: default options that name modules among the default targets (IA³'s
            ``feedforward_modules``): dropped when the user chooses other ``target_modules``.
    """

    name: str
    config_class: type[AdapterConfig]
    family: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    lr: float = 1e-3
    within_targets: tuple[str, ...] = ()

    def options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The user's ``given`` options over this method's defaults (``fixed`` not included)."""
        values = dict(self.defaults)
        if "target_modules" in given:
            for key in self.within_targets:
                values.pop(key, None)
        values.update(given)
        return values


_LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "target_modules": list(ATTENTION)}
_VIRTUAL_TOKENS = {"num_virtual_tokens": 20}

# Learning rates are the usual starting points for short runs of each family (soft prompts need ~30x
# more than LoRA; full fine-tuning, which is not a method config, ~20x less).
METHOD_TABLE: tuple[Method, ...] = (
    Method("lora", LoraConfig, "reparameterization", _LORA_DEFAULTS, lr=1e-3),
    Method("dora", LoraConfig, "reparameterization", _LORA_DEFAULTS, fixed={"use_dora": True}, lr=1e-3),
    Method(
        "ia3",
        IA3Config,
        "reparameterization",
        {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        lr=1e-2,
        within_targets=("feedforward_modules",),
    ),
    Method("adapter", BottleneckConfig, "additive", lr=1e-3),
    Method("prompt", PromptTuningConfig, "additive", _VIRTUAL_TOKENS, lr=3e-2),
    Method("p-tuning", PromptEncoderConfig, "additive", _VIRTUAL_TOKENS, lr=1e-3),
    Method("prefix", PrefixTuningConfig, "additive", _VIRTUAL_TOKENS, lr=1e-2),
    Method("selective", SelectiveConfig, "selective", {"target_modules": list(ATTENTION)}, lr=1e-3),
    Method("ln-tuning", LNTuningConfig, "selective", lr=1e-3),
)

METHODS: dict[str, type[AdapterConfig]] = {
    entry.config_class.peft_type: entry.config_class for entry in METHOD_TABLE
}


def method_by_name(name: str) -> Method | None:
    """The table entry named ``name``, or None."""
    return next((entry for entry in METHOD_TABLE if entry.name == name), None)
