"""Method names of the command line (``--method lora``) → peftkit config objects, looked up at run time.

A method is found by its config class exported from ``peftkit`` or by its ``peft_type`` in the
registry (``peftkit.methods.METHODS``), so a method that lands later works here without changes; one
that is missing gives "method X is not available in this version". ``full`` needs no config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peftkit.config import AdapterConfig
from peftkit.errors import UsageError
from peftkit.training.config import closest

__all__ = ["METHOD_NAMES", "MethodSpec", "build_method_config", "method_class", "method_fields"]

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq2seq-lm": "SEQ_2_SEQ_LM", "seq-cls": "SEQ_CLS"}


@dataclass(frozen=True)
class MethodSpec:
    """How to find a method's config class and what it defaults to.

    Args:
        class_names: config classes to look for in ``peftkit`` (first found wins).
        peft_types: registry keys to look for when no class name is exported.
        defaults: options used unless the user sets them; keys the class lacks are skipped.
        variant_of: ``(class name, field, value)``: also accept a class that has ``field``, with it set
            to ``value`` (DoRA as ``LoraConfig(use_dora=True)``, as in Hugging Face PEFT).
    """

    class_names: tuple[str, ...]
    peft_types: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    variant_of: tuple[str, str, Any] | None = None


_LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "target_modules": ATTENTION}
METHOD_SPECS: dict[str, MethodSpec | None] = {
    "lora": MethodSpec(("LoraConfig",), ("LORA",), _LORA_DEFAULTS),
    "dora": MethodSpec(
        ("DoraConfig",), ("DORA",), _LORA_DEFAULTS, variant_of=("LoraConfig", "use_dora", True)
    ),
    "ia3": MethodSpec(
        ("IA3Config", "Ia3Config"),
        ("IA3",),
        {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    ),
    "prompt": MethodSpec(("PromptTuningConfig",), ("PROMPT_TUNING",), {"num_virtual_tokens": 20}),
    "prefix": MethodSpec(("PrefixTuningConfig",), ("PREFIX_TUNING",), {"num_virtual_tokens": 20}),
    "adapter": MethodSpec(
        ("BottleneckConfig", "BottleneckAdapterConfig", "AdapterBottleneckConfig"),
        ("BOTTLENECK", "ADAPTER", "BOTTLENECK_ADAPTER"),
    ),
    "selective": MethodSpec(("SelectiveConfig",), ("SELECTIVE",), {"target_modules": ATTENTION}),
    "full": None,
}
METHOD_NAMES = tuple(METHOD_SPECS)


def method_class(method: str) -> tuple[type[AdapterConfig], dict[str, Any]] | None:
    """``(config class, fixed options)`` for ``method``; None for ``full``.

    Raises:
        UsageError: an unknown method name, or a method this version of peftkit lacks.
    """
    if method not in METHOD_SPECS:
        raise UsageError(
            f"unknown method {method!r}; use one of {', '.join(METHOD_NAMES)}{closest(method, METHOD_NAMES)}"
        )
    spec = METHOD_SPECS[method]
    if spec is None:
        return None
    import peftkit
    from peftkit.methods import METHODS

    for name in spec.class_names:
        found = getattr(peftkit, name, None)
        if isinstance(found, type) and issubclass(found, AdapterConfig):
            return found, {}
    for peft_type in spec.peft_types:
        if peft_type in METHODS:
            return METHODS[peft_type], {}
    if spec.variant_of is not None:
        class_name, flag, value = spec.variant_of
        found = getattr(peftkit, class_name, None)
        if found is not None and flag in {f.name for f in dataclasses.fields(found)}:
            return found, {flag: value}
    available = [name for name in METHOD_NAMES if name == method or _is_available(name)]
    raise UsageError(
        f"method {method!r} is not available in this version of peftkit (no {spec.class_names[0]}); "
        f"available: {', '.join(name for name in available if name != method)}"
    )


def method_fields(method: str) -> set[str]:
    """The option names ``method``'s config class accepts (empty for ``full``)."""
    found = method_class(method)
    if found is None:
        return set()
    return {f.name for f in dataclasses.fields(found[0])} - set(found[1])


def build_method_config(method: str, options: Mapping[str, Any], task: str) -> AdapterConfig | None:
    """The config object for ``method`` with the user's ``options`` over its defaults; None for ``full``.

    Raises:
        UsageError: an unavailable method, an unknown option (with the closest known one), or a value
            the config class refuses (e.g. ``r=0``).
    """
    found = method_class(method)
    if found is None:
        if options:
            raise UsageError(f"method 'full' takes no method_options, got {sorted(options)}")
        return None
    cls, fixed = found
    known = {f.name for f in dataclasses.fields(cls)}
    for key in options:
        if key not in known or key in fixed:
            raise UsageError(
                f"unknown option {key!r} for method {method!r} ({cls.__name__}){closest(key, known)}"
            )
    spec = METHOD_SPECS[method]
    assert spec is not None
    values = {key: value for key, value in spec.defaults.items() if key in known}
    if "target_modules" in options:  # default feed-forward modules must be a subset of the user's targets
        values.pop("feedforward_modules", None)
    if "task_type" in known:
        values["task_type"] = TASK_TYPES[task]
    values.update(options)
    values.update(fixed)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"method {method!r}: {e}") from e


def _is_available(method: str) -> bool:
    try:
        method_class(method)
    except UsageError:
        return False
    return True
