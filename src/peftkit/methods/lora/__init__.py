"""LoRA and its variants: a frozen weight W plus a trainable low-rank update ``s·B·A``.

- :mod:`~peftkit.methods.lora.config`: ``LoraConfig`` and the table of variants;
- :mod:`~peftkit.methods.lora.adapters`: the adapters (Linear/Conv1D, Embedding, Conv) and ΔW maths;
- :mod:`~peftkit.methods.lora.dora`: DoRA (magnitude and direction);
- :mod:`~peftkit.methods.lora.pissa`: PiSSA / OLoRA initialisation and ``convert_to_lora``;
- :mod:`~peftkit.methods.lora.loftq`: LoftQ initialisation on quantized bases.
"""

from peftkit.methods.lora.adapters import (
    LoraConv,
    LoraEmbedding,
    LoraLinear,
    conv_delta_weight,
    linear_delta_weight,
    lora_scaling,
)
from peftkit.methods.lora.config import VARIANTS, LoraConfig, LoraVariant
from peftkit.methods.lora.dora import DoraLinear
from peftkit.methods.lora.loftq import loftq_factors, replace_lora_weights_loftq
from peftkit.methods.lora.pissa import PrincipalLoraLinear, convert_to_lora, is_principal_init

__all__ = [
    "VARIANTS",
    "DoraLinear",
    "LoraConfig",
    "LoraConv",
    "LoraEmbedding",
    "LoraLinear",
    "LoraVariant",
    "PrincipalLoraLinear",
    "conv_delta_weight",
    "convert_to_lora",
    "is_principal_init",
    "linear_delta_weight",
    "loftq_factors",
    "lora_scaling",
    "replace_lora_weights_loftq",
]
