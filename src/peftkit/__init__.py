"""peftkit: parameter-efficient fine-tuning for any PyTorch model and Hugging Face transformers models."""

from peftkit.config import AdapterConfig
from peftkit.memory import estimate, measure_training_step
from peftkit.methods import (
    BottleneckConfig,
    HoulsbyConfig,
    IA3Config,
    LNTuningConfig,
    LoraConfig,
    PfeifferConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    SelectiveConfig,
)
from peftkit.methods.lora.pissa import convert_to_lora
from peftkit.model import PeftModel, load, wrap
from peftkit.optim import lora_plus_optimizer

__version__ = "0.1.0"

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
    "wrap",
]
