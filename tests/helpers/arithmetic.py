"""What the adapter-arithmetic tests share."""

from __future__ import annotations

import peftkit

from helpers.tiny_models import TinyModel


def two_lora_configs(tiny: TinyModel) -> tuple[peftkit.LoraConfig, peftkit.LoraConfig]:
    """Two LoRA adapters of different ranks and alphas, one rsLoRA with rank and alpha patterns, that
    overlap on the second target only: the first target is b's alone, the later ones a's alone."""
    targets = list(tiny.targets)
    a = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=targets[1:])
    b = peftkit.LoraConfig(
        r=6,
        lora_alpha=3,
        use_rslora=True,
        target_modules=targets[:2],
        rank_pattern={targets[1]: 2},
        alpha_pattern={targets[0]: 5},
    )
    return a, b
