"""``wrap`` and ``load``: the two ways into a :class:`~peftkit.model.PeftModel` from a base model."""

from __future__ import annotations

import os

from torch import nn

from peftkit.core.adapter_config import AdapterConfig
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.model.files import DEFAULT_ADAPTER_NAME
from peftkit.model.peft_model import _WRAPPERS, PeftModel, _check_module


def wrap(model: nn.Module, config: AdapterConfig, adapter_name: str = DEFAULT_ADAPTER_NAME) -> PeftModel:
    """Inject a new adapter into ``model`` (changed in place) and return the :class:`PeftModel`.

    Only the adapter's parameters (and what ``bias`` / ``modules_to_save`` add) stay trainable.

    Raises:
        TypeError: ``model`` is a PeftModel already (use its ``add_adapter``).
        ValueError: ``model`` holds peftkit adapters already (an earlier ``wrap`` or ``load`` changed
            it in place: add to the PeftModel it returned), or the config targets nothing (the message
            lists candidate module names).
    """
    _check_unwrapped(model, "model.add_adapter(name, config)")
    peft_model = PeftModel(model)
    peft_model.add_adapter(adapter_name, config)
    return peft_model


def load(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    is_trainable: bool = False,
) -> PeftModel:
    """Load a saved adapter (peftkit's or Hugging Face PEFT's) onto ``model`` (changed in place).

    Args:
        model: the base model the adapter was trained on.
        path: an adapter directory or a Hugging Face Hub repo id.
        adapter_name: the name it gets here.
        is_trainable: keep its parameters trainable to continue training.

    Raises:
        TypeError: ``model`` is a PeftModel already: add the adapter with its ``load_adapter``.
        ValueError: ``model`` holds peftkit adapters already (an earlier ``wrap`` or ``load`` changed
            it in place: add to the PeftModel it returned), or the files do not fit it.
        FileNotFoundError: no adapter at ``path``.
    """
    _check_unwrapped(model, "model.load_adapter(path, adapter_name=...)")
    peft_model = PeftModel(model)
    peft_model.load_adapter(path, adapter_name, is_trainable=is_trainable)
    return peft_model


def _check_unwrapped(model: nn.Module, instead: str) -> None:
    """Refuse a PeftModel, or a base model that a live PeftModel wraps or that holds peftkit wrappers.

    A second wrapper over the same base would re-freeze the first one's adapters and share (or
    replace) the adapters in its layers. ``instead`` is the call that adds an adapter to the first.
    """
    _check_module(model)
    if isinstance(model, PeftModel):
        raise TypeError(f"model is a PeftModel already; call {instead} instead")
    owner = _WRAPPERS.get(id(model))
    held = owner is not None and owner.model is model and bool(owner.peft_config)  # unload() empties it
    if held or any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in model.modules()):
        raise ValueError(
            "model holds peftkit adapters already (wrap and load change the base model in place); "
            f"call {instead} on the PeftModel they returned, or start from a freshly loaded base model"
        )
