"""The base adapter config and ``adapter_config.json`` read/write in Hugging Face PEFT's layout.

A method's config is a frozen dataclass deriving from :class:`AdapterConfig`. Its field names and
defaults follow Hugging Face PEFT's, so a config written here loads there and the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from peftkit.foundation.tasks import TASK_TYPES


def _as_tuple(value: Any) -> Any:
    """Lists and sets become tuples, so a frozen config holds no mutable sequence."""
    if isinstance(value, (list, set, frozenset)):
        return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    return value


@dataclass(frozen=True)
class AdapterConfig:
    """Fields every method shares: where to inject (targeting) and what else to train.

    Args:
        target_modules: module names to adapt: a list of exact names or name suffixes
            (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), a regular expression that must
            match the whole name, or ``"all-linear"`` (every linear layer except the output head).
        exclude_modules: names to leave alone, with the same rules as ``target_modules``.
        layers_to_transform: keep only modules inside these block indices (``layers.<i>.``).
        layers_pattern: the name of the block list (``"layers"``, ``"h"``) when not guessable.
        modules_to_save: modules (e.g. a classification head) trained as full copies and saved.
        task_type: Hugging Face PEFT's task type (``"CAUSAL_LM"`` …); informational.
        base_model_name_or_path: the base model the adapter was trained on; informational.
        inference_mode: written as Hugging Face PEFT writes it; loading decides trainability.
    """

    peft_type: ClassVar[str] = ""
    #: Whether ``merge_adapter`` can fold the method into the base weights (soft prompts and
    #: bottleneck adapters add computation the weights cannot hold).
    mergeable: ClassVar[bool] = True
    #: Fields Hugging Face PEFT knows for this method that peftkit does not implement. A file that sets
    #: one of them to a value other than its default is refused; at the default it is ignored.
    unsupported_fields: ClassVar[Mapping[str, Any]] = {}

    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    modules_to_save: Sequence[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _as_tuple(getattr(self, f.name)))
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(
                f"task_type={self.task_type!r} is not one of {list(TASK_TYPES)}; "
                "use one of them or leave it unset"
            )

    def is_supported(self, module: nn.Module) -> bool:
        """Whether this method can adapt ``module`` (used by targeting)."""
        raise NotImplementedError

    def build_adapter(self, module_name: str, base: nn.Module) -> nn.Module:
        """The adapter for ``base`` found at ``module_name``: an :class:`peftkit.core.layer.Adapter`."""
        raise NotImplementedError

    def with_default_targets(self, model: nn.Module) -> AdapterConfig:
        """This config with the targets it leaves to the model filled in (``target_modules`` unset:
        the architecture's default, :mod:`peftkit.methods.default_targets`); ``self`` when there are
        none. Called when the adapter is added, so the config kept and saved names the modules."""
        return self

    def initialize(self, model: nn.Module, adapter_name: str) -> None:
        """Finish initialising adapter ``adapter_name`` once it is in ``model`` (the base model), for
        initialisations that need more than one layer (LoRA's LoftQ reads the base's float weights).
        Nothing by default."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict Hugging Face PEFT writes: its field names, ``peft_type`` upper-case."""
        data: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with ``changes`` applied (configs are frozen)."""
        return dataclasses.replace(self, **changes)


def config_from_dict(data: Mapping[str, Any], methods: Mapping[str, type[AdapterConfig]]) -> AdapterConfig:
    """Build the config a dict (an ``adapter_config.json``) describes.

    Unknown fields are dropped with a warning, as Hugging Face PEFT does. Fields Hugging Face PEFT
    knows but peftkit does not implement are accepted at their default value and refused otherwise.

    Raises:
        ValueError: ``peft_type`` is missing or names a method peftkit lacks, or an unimplemented
            feature is switched on.
    """
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ValueError("adapter config has no 'peft_type'; it is required (e.g. \"LORA\")")
    config_class = methods.get(str(peft_type).upper())
    if config_class is None:
        raise ValueError(f"peft_type={peft_type!r} is not supported; peftkit knows {sorted(methods)}")
    known = {f.name for f in dataclasses.fields(config_class)}
    kwargs: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in data.items():
        if key in known:
            kwargs[key] = value
        elif key in config_class.unsupported_fields:
            if value != config_class.unsupported_fields[key] and value not in (None, False, {}, []):
                raise ValueError(
                    f"adapter config sets {key}={value!r}, a {peft_type} feature peftkit does not "
                    f"implement; only the default ({config_class.unsupported_fields[key]!r}) is accepted"
                )
        elif key not in _IGNORED_COMMON_FIELDS:
            unknown.append(key)
    if unknown:
        warnings.warn(f"ignoring unknown adapter config fields: {sorted(unknown)}", stacklevel=2)
    return config_class(**kwargs)


# Bookkeeping fields Hugging Face PEFT writes for every method; they carry no behaviour.
_IGNORED_COMMON_FIELDS = frozenset({"peft_type", "peft_version", "auto_mapping", "revision"})


def config_to_json(config: AdapterConfig) -> str:
    """``adapter_config.json`` text: Hugging Face PEFT's layout (``indent=2, sort_keys=True``)."""
    data = config.to_dict()
    data["inference_mode"] = True
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
