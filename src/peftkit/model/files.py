"""Adapter files in Hugging Face PEFT's layout, both ways: what ``PeftModel.load_adapter``,
``load_adapter_weights``, ``save_pretrained`` and ``adapter_state_dict`` do to an :class:`AdapterSet`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from peftkit.core.adapter_config import AdapterConfig, config_from_dict, config_to_json
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.core.whole_model import is_model_level
from peftkit.foundation.io import KEY_PREFIX, read_adapter, resolve_adapter_dir, write_adapter
from peftkit.methods import config_classes
from peftkit.model.adapter_set import AdapterSet

DEFAULT_ADAPTER_NAME = "default"


def load_adapter(
    adapters: AdapterSet, path: str | os.PathLike[str], adapter_name: str, is_trainable: bool
) -> None:
    """Add the adapter saved at ``path`` as ``adapter_name`` (see ``PeftModel.load_adapter``)."""
    config_dict, tensors = read_adapter(resolve_adapter_dir(path))
    config = config_from_dict(config_dict, config_classes())
    if is_model_level(config):  # the saved form: e.g. P-tuning's encoder output as a plain embedding
        config = config.replace(inference_mode=True)
    adapters.add(adapter_name, config, trainable=is_trainable, strict_targets=False)
    try:
        load_tensors(adapters, adapter_name, tensors, source=str(path))
    except Exception:
        adapters.remove(adapter_name)
        raise


def load_adapter_weights(adapters: AdapterSet, path: str | os.PathLike[str], adapter_name: str) -> None:
    """Write the values saved at ``path`` into the existing adapter ``adapter_name`` in place (see
    ``PeftModel.load_adapter_weights``)."""
    adapters.check_known([adapter_name])
    config_dict, tensors = read_adapter(resolve_adapter_dir(path))
    methods = config_classes()
    saved = config_from_dict(config_dict, methods)
    current = config_from_dict(json.loads(config_json(adapters, adapter_name)), methods)
    _check_same_config(saved, current, str(path), adapter_name)
    held = itertools.chain(
        adapters.model.parameters(),
        adapters.model.buffers(),
        adapters.model_adapters.parameters(),
        adapters.model_adapters.buffers(),
    )
    held_ids = {id(t) for t in held}
    state = adapter_state_dict(adapters, adapter_name)
    computed = [key for key, t in state.items() if id(t) not in held_ids]
    if computed:
        raise ValueError(
            f"adapter {adapter_name!r} is saved as a table its trainable modules compute ({computed[0]}: "
            "P-tuning's encoder output, a projected prefix), so a file cannot restore those modules; "
            "continue such a run with `peftkit train --resume`, whose checkpoints keep them"
        )
    load_tensors(adapters, adapter_name, tensors, source=str(path))


def _check_same_config(saved: AdapterConfig, current: AdapterConfig, path: str, adapter_name: str) -> None:
    """Refuse a file saved with another config than the adapter it would overwrite, naming the fields."""
    differing = [
        f"{name}: {getattr(saved, name, None)!r} in the file, {getattr(current, name)!r} here"
        for name in (f.name for f in dataclasses.fields(current))
        if name != "base_model_name_or_path" and getattr(saved, name, None) != getattr(current, name)
    ]
    if type(saved) is not type(current) or differing:
        what = "; ".join(differing) or f"{saved.peft_type} in the file, {current.peft_type} here"
        raise ValueError(
            f"adapter {path!r} was saved with another config than adapter {adapter_name!r} "
            f"({what}); wrap the base model with the config it was trained with, or add it as a new "
            "adapter with load_adapter()"
        )


def save_adapters(adapters: AdapterSet, save_directory: str | os.PathLike[str], names: Sequence[str]) -> None:
    """Write each named adapter atomically, ``"default"`` into ``save_directory`` and any other name
    into ``save_directory/<name>/`` (see ``PeftModel.save_pretrained``)."""
    adapters.check_known(names)
    for name in names:
        directory = Path(save_directory)
        if name != DEFAULT_ADAPTER_NAME:
            directory = directory / name
        write_adapter(directory, config_json(adapters, name), adapter_state_dict(adapters, name))


def adapter_state_dict(adapters: AdapterSet, adapter_name: str) -> dict[str, Tensor]:
    """The adapter's live tensors under their file keys (``base_model.model.<module>.<param>``)."""
    adapters.check_known([adapter_name])
    state: dict[str, Tensor] = {}
    saved_prefix = KEY_PREFIX
    if adapter_name in adapters.model_adapters:
        model_adapter = adapters.model_adapters[adapter_name]
        state.update(model_adapter.file_tensors(adapters.model))
        saved_prefix = model_adapter.key_prefix
    for path, wrapper in adapters.wrappers():
        if isinstance(wrapper, AdapterLayer) and adapter_name in wrapper.adapters:
            for name, param in wrapper.adapters[adapter_name].named_parameters():
                state[f"{KEY_PREFIX}{path}.{name}"] = param
        elif isinstance(wrapper, ModulesToSave) and adapter_name in wrapper.copies:
            for name, param in wrapper.copies[adapter_name].named_parameters():
                state[f"{saved_prefix}{path}.{name}"] = param
    for key, param in adapters.trained_biases(adapter_name):
        state[KEY_PREFIX + key] = param
    return state


def load_tensors(adapters: AdapterSet, adapter_name: str, tensors: dict[str, Tensor], source: str) -> None:
    """Copy ``tensors`` (file keys) into the adapter's parameters, all or none.

    Raises:
        ValueError: a tensor missing from ``tensors``, one that matches no module here, or one of
            another shape; nothing is copied then.
    """
    expected = adapter_state_dict(adapters, adapter_name)
    missing = sorted(set(expected) - set(tensors))
    # HF PEFT also saves the full base matrix of targeted embedding layers (resized vocabularies):
    # optional, and loaded into the base module as HF PEFT does.
    base_weights = {
        f"{KEY_PREFIX}{path}.base_layer.weight": wrapper.base.weight
        for path, wrapper in adapters.wrappers()
        if isinstance(wrapper, AdapterLayer) and adapter_name in wrapper.adapters
    }
    expected.update({key: param for key, param in base_weights.items() if key in tensors})
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing from the file, e.g. {missing[:3]}")
        if unexpected:
            parts.append(
                f"{len(unexpected)} tensor(s) in the file match no module here, e.g. {unexpected[:3]}"
            )
        raise ValueError(
            f"adapter {source!r} does not fit this model: {'; '.join(parts)}. Was it trained on "
            "another base model or with another config?"
        )
    for key, param in expected.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise ValueError(
                f"adapter {source!r}: tensor {key} has shape {tuple(tensors[key].shape)} in the file "
                f"but {tuple(param.shape)} here (another rank or base model?)"
            )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(param.dtype))


def config_json(adapters: AdapterSet, adapter_name: str) -> str:
    """The adapter's ``adapter_config.json`` text as both libraries read it back."""
    config = adapters.configs[adapter_name]
    if adapter_name in adapters.model_adapters:
        config = adapters.model_adapters[adapter_name].file_config(config)
    # "all-linear", and a regex with layer indices (which HF PEFT refuses), are written as the exact
    # module names they selected: both libraries then adapt the same modules.
    targets = config.target_modules
    if targets == "all-linear" or (isinstance(targets, str) and config.layers_to_transform is not None):
        config = config.replace(target_modules=adapters.targets[adapter_name])
    name_or_path = getattr(getattr(adapters.model, "config", None), "_name_or_path", None)
    if name_or_path and not config.base_model_name_or_path:
        config = config.replace(base_model_name_or_path=name_or_path)
    return config_to_json(config)
