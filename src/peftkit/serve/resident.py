"""An adapter as the server keeps it in memory (the CPU tier), built from the files it read.

:func:`build_resident` checks an adapter's config and tensors against the served model — field types,
method, rank, which layers it targets, every tensor's key, shape and dtype — and turns it into
per-layer updates: plain LoRA as its factors (A, B, scaling), which the bank's slots stack; any other
layer method (DoRA, IA³, bottleneck adapters…) as the method's own adapter module, applied to its rows.
Nothing here changes the served model.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.core.adapter_config import config_from_dict
from peftkit.core.layer import AdapterLayer
from peftkit.core.targeting import find_targets
from peftkit.core.whole_model import is_model_level
from peftkit.foundation.io import KEY_PREFIX
from peftkit.methods import config_classes
from peftkit.methods.lora.adapters import LoraLinear
from peftkit.serve.adapter_files import AdapterError, AdapterFiles

__all__ = ["LayerUpdate", "ResidentAdapter", "adapter_rank", "build_resident"]


@dataclass(frozen=True)
class LayerUpdate:
    """One layer's part of an adapter: plain LoRA ``factors`` (A (r, in), B (out, r), scaling), or the
    method's ``module`` (called as ``module(base, x, base_output)``) for anything else."""

    factors: tuple[Tensor, Tensor, float] | None = None
    module: nn.Module | None = None


@dataclass(frozen=True)
class ResidentAdapter:
    """A checked adapter in memory: its name, largest LoRA rank, and its update per layer path."""

    name: str
    rank: int
    layers: dict[str, LayerUpdate]


def adapter_rank(config: dict[str, Any]) -> int:
    """The largest rank an adapter config uses (``r`` and any ``rank_pattern`` value); 0 if it has none.

    Raises:
        AdapterError: 400 a rank that is not a positive integer.
    """
    ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks):
        raise AdapterError(
            400, f"adapter config: r and rank_pattern values must be positive integers, got {ranks}"
        )
    return max(ranks)


def build_resident(name: str, files: AdapterFiles, model: nn.Module, max_rank: int | None) -> ResidentAdapter:
    """Check ``files`` against ``model`` (the served model, its linear layers wrapped) and build the
    adapter's per-layer updates.

    Raises:
        AdapterError: 400 naming what is wrong: a config value of the wrong type, an unknown or
            whole-model method, a rank above ``max_rank``, ``modules_to_save`` or trained biases (they
            would change the base model for every request), a target that is not a linear layer,
            tensors missing, unexpected or of another shape, non-finite values.
    """
    _check_types(files.config)
    rank = adapter_rank(files.config)
    if max_rank is not None and rank > max_rank:
        raise AdapterError(
            400, f"adapter {name!r} has rank {rank}, above this server's --max-rank {max_rank}"
        )
    try:
        config = config_from_dict(files.config, config_classes())
    except (ValueError, TypeError) as error:
        raise AdapterError(400, f"adapter {name!r}: {error}") from error
    _check_servable(name, config)
    try:
        targets = find_targets(model, config, strict=False)
        modules = {path: _built(config, path, model) for path in targets}
    except (ValueError, TypeError) as error:
        raise AdapterError(400, f"adapter {name!r} does not fit the served model: {error}") from error
    _load_tensors(name, modules, files.tensors)
    layers = {}
    for path, module in modules.items():
        module.eval().requires_grad_(False)
        if type(module) is LoraLinear:  # plain LoRA: y + s·B·A·x, stacked with the others
            factors = (module.lora_A.weight.detach(), module.lora_B.weight.detach(), float(module.scaling))
            layers[path] = LayerUpdate(factors=factors)
        else:
            layers[path] = LayerUpdate(module=module)
    ranks = [update.factors[0].shape[0] for update in layers.values() if update.factors is not None]
    return ResidentAdapter(name, max(ranks, default=rank), layers)


def _check_types(config: dict[str, Any]) -> None:
    """The fields whose wrong type would otherwise surface deep inside the method as a bare error."""
    targets = config.get("target_modules")
    if targets is not None and not (
        isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise AdapterError(
            400, f"adapter config: target_modules must be a string or a list of strings, got {targets!r}"
        )
    for key in ("lora_alpha", "lora_dropout"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise AdapterError(400, f"adapter config: {key} must be a number, got {value!r}")
    alphas = config.get("alpha_pattern") or {}
    if not isinstance(alphas, dict) or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in alphas.values()
    ):
        raise AdapterError(400, f"adapter config: alpha_pattern must map names to numbers, got {alphas!r}")
    if not isinstance(config.get("rank_pattern") or {}, dict):
        raise AdapterError(400, "adapter config: rank_pattern must map names to ranks")


def _check_servable(name: str, config: Any) -> None:
    if is_model_level(config):
        raise AdapterError(
            400,
            f"adapter {name!r} is a soft prompt or selective adapter; the server mixes layer adapters "
            "(LoRA, IA³, bottleneck) only",
        )
    if config.modules_to_save:
        raise AdapterError(
            400,
            f"adapter {name!r} has modules_to_save {list(config.modules_to_save)} (full copies of modules); "
            "the server adds low-rank and other layer updates per request row only",
        )
    if getattr(config, "bias", "none") != "none":
        raise AdapterError(
            400,
            f"adapter {name!r} trains base biases (bias={config.bias!r}), which would change the base model "
            "for every request; serve it merged (peftkit merge) instead",
        )


def _built(config: Any, path: str, model: nn.Module) -> nn.Module:
    """The method's adapter for the served layer at ``path``, with fresh parameters."""
    layer = model.get_submodule(path)
    if not isinstance(layer, AdapterLayer):
        raise ValueError(f"{path} is a {type(layer).__name__}; the server adapts linear layers only")
    with torch.no_grad():
        return config.build_adapter(path, layer.base)


def _load_tensors(name: str, modules: dict[str, nn.Module], tensors: dict[str, Tensor]) -> None:
    """Copy the file's tensors into ``modules``: every key there, none left over, shapes equal, floats."""
    expected = {
        f"{KEY_PREFIX}{path}.{param_name}": param
        for path, module in modules.items()
        for param_name, param in module.named_parameters()
    }
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = [f"{len(missing)} tensor(s) missing from the file, e.g. {missing[:2]}"] if missing else []
        parts += (
            [f"{len(unexpected)} tensor(s) match no module here, e.g. {unexpected[:2]}"] if unexpected else []
        )
        raise AdapterError(400, f"adapter {name!r} does not fit the served model: {'; '.join(parts)}")
    for key, param in expected.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(param.shape):
            raise AdapterError(
                400,
                f"adapter {name!r} does not fit the served model: {key} has shape {tuple(value.shape)} in "
                f"the file, {tuple(param.shape)} here (another rank than its config says, or another base "
                "model?)",
            )
        if not value.is_floating_point():  # finite values: checked as the file was read (adapter_files)
            raise AdapterError(400, f"adapter {name!r}: {key} holds {value.dtype} values, not floats")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
