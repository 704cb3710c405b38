"""Selective fine-tuning: train a chosen subset of the base model's own parameters, freeze the rest.

Chosen by name (``target_modules``: module or parameter names, as everywhere in peftkit), by block
(``layers_to_transform``, e.g. the last two), biases only (``bias_only``: BitFit, Ben Zaken et al. 2021,
arXiv:2106.10199) or normalization layers only (``norms_only``: LayerNorm / RMSNorm tuning, Zhao et al.
2023, arXiv:2312.11420). Filters that are set all apply (an intersection).

Nothing is injected. The adapter keeps a frozen copy of just the selected tensors, so the original
values can come back: on ``disable_adapters``, when another adapter is activated (values are swapped
on ``set_adapter``), and on ``unload``. Its file holds only the trained tensors, keyed
``base_model.model.<parameter name>``. A selection of whole normalization layers is saved as Hugging
Face PEFT's ``LN_TUNING`` (keys ``base_model.model.<module>.ln_tuning_layers.<param>``), which both
libraries load; :class:`LNTuningConfig` is that method's config.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.adapter_config import AdapterConfig
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.core.targeting import adaptable_modules, layer_index, name_matches
from peftkit.foundation.io import KEY_PREFIX
from peftkit.methods.default_targets import attention_targets

LN_TUNING_INFIX = "ln_tuning_layers"
MAX_NAMES_SHOWN = 12


@dataclass(frozen=True)
class SelectiveConfig(AdapterConfig):
    """Which existing parameters train. Every filter that is set applies.

    Args:
        target_modules: module or parameter names (exact, ``.suffix``, or a full-match regex string):
            ``["lm_head"]``, ``["q_proj.bias"]``, ``r".*\\.mlp\\..*"``.
        exclude_modules: names to leave frozen, same rules.
        layers_to_transform: only parameters in these blocks (``layers.<i>.``, ``h.<i>.``…).
        bias_only: only parameters named ``bias`` (BitFit).
        norms_only: only parameters of normalization layers (a class name containing ``Norm``:
            ``nn.LayerNorm``, ``nn.RMSNorm``, ``LlamaRMSNorm``, ``T5LayerNorm``…).
        modules_to_save: modules trained as separate copies (not selected in place).

    With no filter set, the model's attention projections train (as LoRA's default targets).
    """

    peft_type: ClassVar[str] = "SELECTIVE"

    bias_only: bool = False
    norms_only: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.target_modules == "all-linear":
            raise ValueError(
                f"{name}.target_modules='all-linear' is a LoRA shorthand; name the modules or parameters"
            )

    def resolve(self, model: nn.Module) -> SelectiveConfig:
        """No filter set: the model's attention projections (:mod:`peftkit.methods.default_targets`)."""
        filters = (self.target_modules, self.layers_to_transform)
        if any(f is not None for f in filters) or self.bias_only or self.norms_only:
            return self
        candidates = [name for name, _ in adaptable_modules(model)]
        return self.replace(target_modules=attention_targets(model, candidates).target_modules)

    def build_model_adapter(self, model: nn.Module) -> SelectedParameters:
        """The selection in ``model``, with a frozen copy of the selected values.

        Raises:
            ValueError: nothing is selected (the message names the filters and some parameter names).
        """
        names = select_parameters(model, self)
        params = dict(_named_base_parameters(model))
        return SelectedParameters(names, [params[name] for name in names], _whole_norm_modules(model, names))


@dataclass(frozen=True)
class LNTuningConfig(SelectiveConfig):
    """Hugging Face PEFT's LN tuning: whole normalization layers train (all of them by default).

    Args:
        target_modules: the modules to train whole; default every normalization layer.
        exclude_modules: modules to leave frozen.
    """

    peft_type: ClassVar[str] = "LN_TUNING"
    hf_fields: ClassVar[tuple[str, ...]] = (
        "peft_type",
        "target_modules",
        "exclude_modules",
        "modules_to_save",
        "task_type",
        "base_model_name_or_path",
        "inference_mode",
    )

    def __post_init__(self) -> None:
        if self.target_modules is None:
            object.__setattr__(self, "norms_only", True)
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        """Only the fields HF PEFT's ``LNTuningConfig`` has."""
        return {key: value for key, value in super().to_dict().items() if key in self.hf_fields}


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer: torch's, or any class whose name contains ``Norm``."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "Norm" in type(module).__name__


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, str, nn.Module, nn.Parameter]]:
    """(parameter name, module name, module, parameter), seeing through LoRA-style wrappers to ``base``."""
    if isinstance(module, AdapterLayer):
        module = module.base
    elif isinstance(module, ModulesToSave):
        return  # trained as whole copies already
    for short, param in module._parameters.items():
        if param is not None:
            yield prefix + short, prefix.rstrip("."), module, param
    for child_name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}{child_name}.")


def _named_base_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The base model's own parameters under their original names; a tied tensor under its first name."""
    seen: set[int] = set()
    for name, _, _, param in _walk(model, ""):
        if id(param) not in seen:
            seen.add(id(param))
            yield name, param


def select_parameters(model: nn.Module, config: SelectiveConfig) -> list[str]:
    """The names of the parameters ``config`` selects in ``model``, in model order.

    A tied tensor (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) is selected when any of its
    names passes every filter, and is reported under its first name.

    Raises:
        ValueError: the selection is empty; the message says which filters were set and shows
            parameter names to choose from.
    """
    first_name: dict[int, str] = {}
    selected: dict[int, str] = {}
    for name, module_name, module, param in _walk(model, ""):
        first_name.setdefault(id(param), name)
        if id(param) not in selected and _passes(config, name, module_name, module):
            selected[id(param)] = first_name[id(param)]
    if not selected:
        filters = {
            field: getattr(config, field)
            for field in (
                "target_modules",
                "exclude_modules",
                "layers_to_transform",
                "bias_only",
                "norms_only",
            )
            if getattr(config, field) not in (None, False)
        }
        names = list(first_name.values())
        shown = names[:MAX_NAMES_SHOWN] + (["..."] if len(names) > MAX_NAMES_SHOWN else [])
        raise ValueError(
            f"{type(config).__name__} with {filters} selects no parameter; the model has {shown}"
        )
    return [name for param_id, name in first_name.items() if param_id in selected]


def _passes(config: SelectiveConfig, name: str, module_name: str, module: nn.Module) -> bool:
    """Whether the parameter ``name`` of ``module`` passes every filter ``config`` sets."""
    if config.modules_to_save and module_name and name_matches(module_name, list(config.modules_to_save)):
        return False
    if config.target_modules is not None and not _matches(name, module_name, config.target_modules):
        return False
    if config.exclude_modules is not None and _matches(name, module_name, config.exclude_modules):
        return False
    layers = config.layers_to_transform
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        if layer_index(name, config.layers_pattern) not in wanted:
            return False
    if config.bias_only and name.rsplit(".", 1)[-1] != "bias":
        return False
    return not config.norms_only or is_norm(module)


def _matches(param_name: str, module_name: str, patterns: Any) -> bool:
    return name_matches(param_name, patterns) or (bool(module_name) and name_matches(module_name, patterns))


def _whole_norm_modules(model: nn.Module, names: list[str]) -> list[str] | None:
    """The module names when ``names`` are exactly all parameters of some normalization layers, else None."""
    chosen = set(names)
    entries = list(_walk(model, ""))
    modules = list(dict.fromkeys(module_name for name, module_name, _, _ in entries if name in chosen))
    wanted = set(modules)
    whole = all(
        name in chosen and is_norm(module)
        for name, module_name, module, _ in entries
        if module_name in wanted
    )
    return modules if whole and all(modules) else None


class SelectedParameters(nn.Module):
    """A selective adapter: names of base parameters, their original values, and its own values.

    While active, the base parameters hold this adapter's values and are what trains; while inactive
    its values wait in ``trained_<i>`` buffers and the base holds the originals (``original_<i>``).
    Buffers are not persistent: the adapter file is the way to save it.

    Args:
        names: the selected parameters' names in the base model.
        params: those parameters (their current values are the originals).
        norm_modules: when the selection is whole normalization layers, their names (saved as LN_TUNING).
    """

    key_prefix = KEY_PREFIX

    def __init__(self, names: list[str], params: list[nn.Parameter], norm_modules: list[str] | None) -> None:
        super().__init__()
        self.names = list(names)
        self.norm_modules = norm_modules
        self.applied = False
        self.merged = False
        for i, param in enumerate(params):
            self.register_buffer(f"original_{i}", param.detach().clone(), persistent=False)
            self.register_buffer(f"trained_{i}", param.detach().clone(), persistent=False)

    def _live(self, model: nn.Module) -> list[nn.Parameter]:
        params = dict(_named_base_parameters(model))
        return [params[name] for name in self.names]

    def _buffers_named(self, kind: str) -> list[Tensor]:
        return [getattr(self, f"{kind}_{i}") for i in range(len(self.names))]

    @torch.no_grad()
    def activate(self, model: nn.Module) -> None:
        """Write this adapter's values into the base parameters."""
        if self.applied:
            return
        for i, (param, value) in enumerate(
            zip(self._live(model), self._buffers_named("trained"), strict=True)
        ):
            param.copy_(value)
            setattr(self, f"trained_{i}", None)  # the base parameter holds them now
        self.applied = True

    @torch.no_grad()
    def deactivate(self, model: nn.Module) -> None:
        """Keep this adapter's values aside and put the original values back."""
        if not self.applied:
            return
        for i, (param, original) in enumerate(
            zip(self._live(model), self._buffers_named("original"), strict=True)
        ):
            setattr(self, f"trained_{i}", param.detach().clone())
            param.copy_(original)
        self.applied = False

    def set_trainable(self, model: nn.Module, trainable: bool) -> None:
        """Gradients for the selected base parameters (only while applied)."""
        if trainable and self.applied:
            for param in self._live(model):
                param.requires_grad_(True)

    def prepare_inputs(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Unchanged: the values are in the weights."""
        return args, kwargs

    def prepare_generate(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Unchanged: the values are in the weights."""
        return args, kwargs

    def file_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """The adapter's values (the live parameters while applied) under their file keys."""
        values = self._live(model) if self.applied else self._buffers_named("trained")
        return {self._file_key(name): value for name, value in zip(self.names, values, strict=True)}

    def _file_key(self, name: str) -> str:
        if self.norm_modules is None:
            return KEY_PREFIX + name
        module, param = name.rsplit(".", 1)
        return f"{KEY_PREFIX}{module}.{LN_TUNING_INFIX}.{param}"

    def file_config(self, config: AdapterConfig) -> AdapterConfig:
        """Whole normalization layers are written as HF PEFT's LN_TUNING, naming the exact modules."""
        if self.norm_modules is None:
            return config
        return LNTuningConfig(
            target_modules=self.norm_modules,
            modules_to_save=config.modules_to_save,
            task_type=config.task_type,
            base_model_name_or_path=config.base_model_name_or_path,
        )

    def merge(self, model: nn.Module) -> None:
        """The values are in the weights already while active; merging records that.

        Raises:
            ValueError: the adapter is not active (its values are not in the weights).
        """
        if not self.applied:
            raise ValueError("a selective adapter can be merged only while active; set_adapter() it first")
        self.merged = True

    def unmerge(self, model: nn.Module) -> None:
        """Forget the merge (the values stay while the adapter is active)."""
        self.merged = False

    @torch.no_grad()
    def release(self, model: nn.Module, keep_values: bool) -> None:
        """On delete / unload: put the original values back unless ``keep_values`` (merge_and_unload)."""
        if self.applied and not keep_values:
            for param, original in zip(self._live(model), self._buffers_named("original"), strict=True):
                param.copy_(original)
        self.applied = False
