"""The registry of methods: ``peft_type`` (as in ``adapter_config.json``) → config class."""

from peftkit.config import AdapterConfig
from peftkit.methods.lora import LoraConfig

METHODS: dict[str, type[AdapterConfig]] = {
    LoraConfig.peft_type: LoraConfig,
}

__all__ = ["METHODS", "LoraConfig"]
