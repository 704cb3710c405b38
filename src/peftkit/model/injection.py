"""What adding one adapter puts into a base model, built before the model changes: :func:`build_injection`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftkit.core.adapter_config import AdapterConfig
from peftkit.core.layer import AdapterLayer, outer_modules
from peftkit.core.targeting import CLASSIFIER_HEAD_NAMES, find_targets, name_matches
from peftkit.core.whole_model import ModelAdapter, is_model_level


@dataclass(frozen=True)
class Injection:
    """One adapter, built and not yet placed.

    Attributes:
        config: the config as it will be kept: with a ``SEQ_CLS`` head in ``modules_to_save``, default
            targets filled in, a model-level config resolved against the model.
        targets: the paths of the modules that get a layer adapter (none for a model-level method).
        layer_adapters: path → the adapter built for the module there (its original, when wrapped).
        model_adapter: the model-level adapter (soft prompt, selective), or None.
        saved: the paths of the ``modules_to_save`` that get a trained copy.
    """

    config: AdapterConfig
    targets: list[str]
    layer_adapters: dict[str, nn.Module]
    model_adapter: nn.Module | None
    saved: list[str]


def build_injection(
    model: nn.Module, config: AdapterConfig, strict_targets: bool, active_model_level: list[ModelAdapter]
) -> Injection:
    """Build the adapter ``config`` describes for ``model``, leaving the model as it was.

    Args:
        model: the base model, possibly holding peftkit's wrappers already.
        strict_targets: refuse ``target_modules`` entries that match nothing (else warn).
        active_model_level: the active model-level adapters; deactivated while a new model-level adapter
            is built, so that it is built against the plain base model.

    Raises:
        ValueError: a config that targets nothing (the message lists the candidates), or
            ``modules_to_save`` naming no module.
    """
    config = _with_task_head(model, config)
    model_adapter = None
    targets: list[str] = []
    if is_model_level(config):
        for active in active_model_level:
            active.deactivate(model)
        try:
            config = config.resolve(model)
            model_adapter = config.build_model_adapter(model).to(_device_of(model))
            model_adapter.train(model.training)
        finally:
            for active in active_model_level:
                active.activate(model)
    else:
        config = config.with_default_targets(model)  # target_modules unset: the architecture's default
        targets = find_targets(model, config, strict=strict_targets)
    layer_adapters = {}
    for name in targets:
        module = model.get_submodule(name)
        base = module.base if isinstance(module, AdapterLayer) else module
        layer_adapters[name] = config.build_adapter(name, base).train(base.training)
    return Injection(config, targets, layer_adapters, model_adapter, _modules_to_save(model, config))


def _with_task_head(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """For ``task_type="SEQ_CLS"`` the freshly initialised classifier head trains too (as in HF PEFT)."""
    if config.task_type != "SEQ_CLS":
        return config
    saved = tuple(config.modules_to_save or ())
    heads = tuple(n for n in CLASSIFIER_HEAD_NAMES if hasattr(model, n) and n not in saved)
    return config.replace(modules_to_save=saved + heads) if heads else config


def _modules_to_save(model: nn.Module, config: AdapterConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    patterns = list(config.modules_to_save)
    names = [
        name
        for name, module in outer_modules(model)
        if name and name_matches(name, patterns) and not isinstance(module, AdapterLayer)
    ]
    if not names:
        raise ValueError(
            f"modules_to_save={patterns} matched no module; give module names such as "
            f"{[name for name, _ in model.named_children()]}"
        )
    return names


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((param.device for param in model.parameters()), torch.device("cpu"))
