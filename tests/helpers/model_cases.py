"""The (tiny model × LoRA config) cases the PeftModel tests run on, and how each is wrapped.

References in those tests are independent of the code under test: the untouched base model (a deep
copy taken before wrapping), each row run alone, and the merged weights. Tolerances: fp32, atol 1e-5
on outputs, 1e-6 on restored weights.
"""

from __future__ import annotations

import pytest
from torch import nn

import peftkit

from helpers.tiny_models import TINY_MODELS, TinyModel, randomize_adapters, twin

ATOL = 1e-5

CONFIGS = {
    "plain": {"r": 4, "lora_alpha": 8},
    "rslora-dropout-patterns": {"r": 4, "lora_alpha": 16, "use_rslora": True, "lora_dropout": 0.1},
    "gaussian-head": {"r": 2, "init_lora_weights": "gaussian", "save_head": True},
}


def make_config(tiny: TinyModel, case: str) -> peftkit.LoraConfig:
    options = dict(CONFIGS[case])
    save_head = options.pop("save_head", False)
    if case == "rslora-dropout-patterns":
        options["rank_pattern"] = {tiny.targets[0]: 2}
        options["alpha_pattern"] = {tiny.targets[-1]: 4}
    return peftkit.LoraConfig(
        target_modules=list(tiny.targets), modules_to_save=[tiny.head] if save_head else None, **options
    )


GRID = [(tiny, case) for tiny in TINY_MODELS for case in CONFIGS]
GRID_IDS = [f"{tiny.name}-{case}" for tiny, case in GRID]


#: ``@grid`` on a test taking ``case``: it runs once per (tiny model, config) case.
grid = pytest.mark.parametrize("case", GRID, ids=GRID_IDS)


def wrapped(tiny: TinyModel, case: str, randomize: bool = True) -> tuple[nn.Module, peftkit.PeftModel]:
    """(an untouched copy of the base, the wrapped model) with random adapter values by default."""
    base = tiny.make()
    reference = twin(base)
    model = peftkit.wrap(base, make_config(tiny, case))
    if randomize:
        randomize_adapters(model)
    return reference, model
