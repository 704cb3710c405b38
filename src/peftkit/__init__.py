"""peftkit: parameter-efficient fine-tuning for any PyTorch model and Hugging Face transformers models.

The public names below are imported on first use (PEP 562), so ``import peftkit`` and ``peftkit --help``
do not pay for torch and transformers until something needs them. ``peftkit.models``, ``peftkit.ops``
and the other subpackages are reachable as attributes too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "AdapterConfig": "peftkit.core.adapter_config",
    "BottleneckConfig": "peftkit.methods.bottleneck",
    "HoulsbyConfig": "peftkit.methods.bottleneck",
    "PfeifferConfig": "peftkit.methods.bottleneck",
    "IA3Config": "peftkit.methods.ia3",
    "LoraConfig": "peftkit.methods.lora.config",
    "convert_to_lora": "peftkit.methods.lora.pissa",
    "replace_lora_weights_loftq": "peftkit.methods.lora.loftq",
    "PromptEncoderConfig": "peftkit.methods.p_tuning",
    "PrefixTuningConfig": "peftkit.methods.prefix_tuning",
    "PromptTuningConfig": "peftkit.methods.prompt_tuning",
    "LNTuningConfig": "peftkit.methods.selective",
    "SelectiveConfig": "peftkit.methods.selective",
    "PeftModel": "peftkit.model",
    "load": "peftkit.model",
    "wrap": "peftkit.model",
    "lora_plus_optimizer": "peftkit.optim",
    "estimate": "peftkit.memory",
    "measure_training_step": "peftkit.memory",
}
_SUBMODULES = frozenset(
    {
        "arithmetic",
        "cli",
        "compare",
        "core",
        "export",
        "foundation",
        "integrations",
        "memory",
        "methods",
        "model",
        "models",
        "ops",
        "serve",
        "training",
    }
)

__all__ = [
    "AdapterConfig",
    "BottleneckConfig",
    "HoulsbyConfig",
    "IA3Config",
    "LNTuningConfig",
    "LoraConfig",
    "PeftModel",
    "PfeifferConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
    "__version__",
    "convert_to_lora",
    "estimate",
    "load",
    "lora_plus_optimizer",
    "measure_training_step",
    "replace_lora_weights_loftq",
    "wrap",
]

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ imports on demand
    from peftkit.core.adapter_config import AdapterConfig
    from peftkit.memory import estimate, measure_training_step
    from peftkit.methods.bottleneck import BottleneckConfig, HoulsbyConfig, PfeifferConfig
    from peftkit.methods.ia3 import IA3Config
    from peftkit.methods.lora.config import LoraConfig
    from peftkit.methods.lora.loftq import replace_lora_weights_loftq
    from peftkit.methods.lora.pissa import convert_to_lora
    from peftkit.methods.p_tuning import PromptEncoderConfig
    from peftkit.methods.prefix_tuning import PrefixTuningConfig
    from peftkit.methods.prompt_tuning import PromptTuningConfig
    from peftkit.methods.selective import LNTuningConfig, SelectiveConfig
    from peftkit.model import PeftModel, load, wrap
    from peftkit.optim import lora_plus_optimizer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"peftkit.{name}")
    else:
        raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
