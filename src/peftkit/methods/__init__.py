"""The registry of methods: ``peft_type`` (as in ``adapter_config.json``) → config class."""

from peftkit.config import AdapterConfig
from peftkit.methods.bottleneck import BottleneckConfig, HoulsbyConfig, PfeifferConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora import LoraConfig
from peftkit.methods.p_tuning import PromptEncoderConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig
from peftkit.methods.selective import LNTuningConfig, SelectiveConfig

METHODS: dict[str, type[AdapterConfig]] = {
    LoraConfig.peft_type: LoraConfig,
    IA3Config.peft_type: IA3Config,
    BottleneckConfig.peft_type: BottleneckConfig,
    SelectiveConfig.peft_type: SelectiveConfig,
    LNTuningConfig.peft_type: LNTuningConfig,
    PromptTuningConfig.peft_type: PromptTuningConfig,
    PromptEncoderConfig.peft_type: PromptEncoderConfig,
    PrefixTuningConfig.peft_type: PrefixTuningConfig,
}

__all__ = [
    "METHODS",
    "BottleneckConfig",
    "HoulsbyConfig",
    "IA3Config",
    "LNTuningConfig",
    "LoraConfig",
    "PfeifferConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
]
