"""Adapter files: Hugging Face PEFT's layout both ways (``load_adapter``, ``load_adapter_weights``,
``save_pretrained``, ``adapter_state_dict``); a mixin of :class:`~peftkit.model.PeftModel`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peftkit.core.adapter_config import config_from_dict, config_to_json
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.core.whole_model import is_model_level
from peftkit.foundation.io import KEY_PREFIX, read_adapter, resolve_adapter_dir, write_adapter
from peftkit.methods import config_classes
from peftkit.model.plain_trainer import warn_if_plain_trainer_saves

DEFAULT_ADAPTER_NAME = "default"


class Files:
    """PeftModel's file methods (its state: ``model``, ``peft_config``, the wrappers)."""

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict``; called by a plain ``transformers.Trainer`` to save the whole model,
        it first warns once that ``peftkit.integrations.Trainer`` saves the adapter instead."""
        warn_if_plain_trainer_saves()
        return super().state_dict(*args, **kwargs)  # type: ignore[misc]

    def load_adapter(
        self,
        path: str | os.PathLike[str],
        adapter_name: str = DEFAULT_ADAPTER_NAME,
        is_trainable: bool = False,
    ) -> None:
        """Load an adapter saved by peftkit or Hugging Face PEFT and add it as ``adapter_name``.

        Args:
            path: an adapter directory, or a Hugging Face Hub repo id.
            adapter_name: the name to give it here.
            is_trainable: leave its parameters trainable (to continue training); else frozen.

        Raises:
            FileNotFoundError: no adapter there, or only pickled weights (never loaded).
            ValueError: a tensor of the file is missing here, unexpected here, or of another shape;
                nothing is loaded then.
        """
        config_dict, tensors = read_adapter(resolve_adapter_dir(path))
        config = config_from_dict(config_dict, config_classes())
        if is_model_level(config):  # the saved form: e.g. P-tuning's encoder output as a plain embedding
            config = config.replace(inference_mode=True)
        self.add_adapter(adapter_name, config, trainable=is_trainable, strict_targets=False)
        try:
            self._load_tensors(adapter_name, tensors, source=str(path))
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def load_adapter_weights(
        self, path: str | os.PathLike[str], adapter_name: str = DEFAULT_ADAPTER_NAME
    ) -> None:
        """Replace the values of the existing adapter ``adapter_name`` by those saved in ``path``.

        For continuing a training run: the parameters are written in place, so an optimizer holding them
        stays valid; trainability and the active adapters do not change. ``peftkit.integrations.Trainer``
        resumes checkpoints this way.

        Raises:
            FileNotFoundError: no adapter at ``path``.
            ValueError: an unknown adapter name; a config that differs from this adapter's (the fields
                are named); a tensor missing, unexpected or of another shape; or an adapter saved as a
                computed table (P-tuning's encoder output, a projected prefix), which cannot restore
                the parameters that compute it. Nothing is changed then.
        """
        self._check_known([adapter_name])
        config_dict, tensors = read_adapter(resolve_adapter_dir(path))
        methods = config_classes()
        saved = config_from_dict(config_dict, methods)
        current = config_from_dict(json.loads(self._config_json(adapter_name)), methods)
        differing = [
            f"{name}: {getattr(saved, name, None)!r} in the file, {getattr(current, name)!r} here"
            for name in (f.name for f in dataclasses.fields(current))
            if name != "base_model_name_or_path" and getattr(saved, name, None) != getattr(current, name)
        ]
        if type(saved) is not type(current) or differing:
            what = "; ".join(differing) or f"{saved.peft_type} in the file, {current.peft_type} here"
            raise ValueError(
                f"adapter {str(path)!r} was saved with another config than adapter {adapter_name!r} "
                f"({what}); wrap the base model with the config it was trained with, or add it as a new "
                "adapter with load_adapter()"
            )
        held = {id(t) for t in itertools.chain(self.parameters(), self.buffers())}
        computed = [key for key, t in self.adapter_state_dict(adapter_name).items() if id(t) not in held]
        if computed:
            raise ValueError(
                f"adapter {adapter_name!r} is saved as a table its trainable modules compute ({computed[0]}: "
                "P-tuning's encoder output, a projected prefix), so a file cannot restore those modules; "
                "continue such a run with `peftkit train --resume`, whose checkpoints keep them"
            )
        self._load_tensors(adapter_name, tensors, source=str(path))

    def save_pretrained(
        self, save_directory: str | os.PathLike[str], selected_adapters: Sequence[str] | None = None
    ) -> None:
        """Write each adapter as Hugging Face PEFT does: ``adapter_config.json`` and
        ``adapter_model.safetensors`` in ``save_directory`` for ``"default"``, in
        ``save_directory/<name>/`` for any other name. Each file is written atomically.
        """
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        self._check_known(names)
        for name in names:
            directory = Path(save_directory)
            if name != DEFAULT_ADAPTER_NAME:
                directory = directory / name
            write_adapter(directory, self._config_json(name), self.adapter_state_dict(name))

    def adapter_state_dict(self, adapter_name: str) -> dict[str, Tensor]:
        """The adapter's tensors under their file keys (``base_model.model.<module>.<param>``).

        The values are the live parameters: detach or clone them before changing them.
        """
        self._check_known([adapter_name])
        config = self.peft_config[adapter_name]
        state: dict[str, Tensor] = {}
        saved_prefix = KEY_PREFIX
        if adapter_name in self.model_adapters:
            state.update(self.model_adapters[adapter_name].file_tensors(self.model))
            saved_prefix = self.model_adapters[adapter_name].key_prefix
        for path, wrapper in self._wrappers():
            if isinstance(wrapper, AdapterLayer) and adapter_name in wrapper.adapters:
                for name, param in wrapper.adapters[adapter_name].named_parameters():
                    state[f"{KEY_PREFIX}{path}.{name}"] = param
            elif isinstance(wrapper, ModulesToSave) and adapter_name in wrapper.copies:
                for name, param in wrapper.copies[adapter_name].named_parameters():
                    state[f"{saved_prefix}{path}.{name}"] = param
        for key, param in self._trained_biases(adapter_name, getattr(config, "bias", "none")):
            state[KEY_PREFIX + key] = param
        return state

    def _load_tensors(self, adapter_name: str, tensors: dict[str, Tensor], source: str) -> None:
        expected = self.adapter_state_dict(adapter_name)
        missing = sorted(set(expected) - set(tensors))
        # HF PEFT also saves the full base matrix of targeted embedding layers (resized vocabularies):
        # optional, and loaded into the base module as HF PEFT does.
        base_weights = {
            f"{KEY_PREFIX}{path}.base_layer.weight": wrapper.base.weight
            for path, wrapper in self._wrappers()
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

    def _config_json(self, adapter_name: str) -> str:
        config = self.peft_config[adapter_name]
        if adapter_name in self.model_adapters:
            config = self.model_adapters[adapter_name].file_config(config)
        # "all-linear", and a regex with layer indices (which HF PEFT refuses), are written as the exact
        # module names they selected: both libraries then adapt the same modules.
        targets = config.target_modules
        if targets == "all-linear" or (isinstance(targets, str) and config.layers_to_transform is not None):
            config = config.replace(target_modules=self._targets[adapter_name])
        name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        if name_or_path and not config.base_model_name_or_path:
            config = config.replace(base_model_name_or_path=name_or_path)
        return config_to_json(config)
