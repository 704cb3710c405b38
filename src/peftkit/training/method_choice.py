"""``--method NAME`` plus options → a method config object, from the method table.

Every entry of :data:`peftkit.methods.METHOD_TABLE` is a method name here; ``full`` (every parameter
trains) needs no config.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from peftkit.foundation.errors import UsageError, closest
from peftkit.foundation.tasks import TASKS
from peftkit.methods import METHOD_TABLE, Method, method_by_name

if TYPE_CHECKING:
    from peftkit.core.adapter_config import AdapterConfig

__all__ = [
    "ALIASES",
    "FULL",
    "METHOD_NAMES",
    "build_method_config",
    "method_entry",
    "method_fields",
    "resolved_options",
    "unknown_name",
]

FULL = "full"
METHOD_NAMES = (*(entry.name for entry in METHOD_TABLE), FULL)
# Names users bring from transformers' TrainingArguments, Hugging Face PEFT and other trainers → ours.
ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "warmup": "warmup_steps",
    "model_name_or_path": "model",
    "lora_r": "r",
    "rank": "r",
    "lora_rank": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "target_modules",
    "target_module": "target_modules",
}


def method_entry(method: str) -> Method | None:
    """The table entry for ``method``; None for ``full``.

    Raises:
        UsageError: an unknown method name, with the closest known one.
    """
    if method == FULL:
        return None
    entry = method_by_name(method)
    if entry is None:
        raise UsageError(
            f"unknown method {method!r}; use one of {', '.join(METHOD_NAMES)}{closest(method, METHOD_NAMES)}"
        )
    return entry


def method_fields(method: str) -> set[str]:
    """The option names ``method``'s config class accepts (empty for ``full``)."""
    entry = method_entry(method)
    if entry is None:
        return set()
    return {f.name for f in dataclasses.fields(entry.config_class)} - set(entry.fixed)


def unknown_name(
    name: str, method: str, settings: Iterable[str], where: str, spell: Callable[[str], str] = str
) -> UsageError:
    """The one error for a name that is neither a training setting nor an option of ``method``.

    Args:
        name: what the user wrote, with ``_`` for ``-``.
        settings: the training settings' names (``TrainConfig`` keys).
        where: the place it was written, e.g. ``"in run.yaml"`` or ``""`` for flags.
        spell: how names are written there (``--r`` for flags, ``r`` in YAML).

    Returns:
        ``unknown setting --lora-r: not a peftkit train setting nor an option of method 'lora' (did you
        mean '--r'?)``, the suggestion taken from :data:`ALIASES` first, then by spelling.
    """
    options = sorted(method_fields(method)) if method in METHOD_NAMES else []
    owners = [entry.name for entry in METHOD_TABLE if name in method_fields(entry.name)]
    if owners:  # right name, wrong method: say whose option it is rather than guess a spelling
        hint = f" ({spell(name)} is an option of method {', '.join(owners)})"
    else:
        hint = closest(spell(name), [spell(key) for key in [*settings, *options]], _spelled(ALIASES, spell))
    place = f" {where}" if where else ""
    return UsageError(
        f"unknown setting {spell(name)!r}{place}: not a peftkit train setting nor an option of method "
        f"{method!r}{hint}"
    )


def _spelled(aliases: Mapping[str, str], spell: Callable[[str], str]) -> dict[str, str]:
    return {spell(key): spell(value) for key, value in aliases.items()}


def resolved_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``method`` really uses: the user's ``options`` over the method table's defaults
    (``{}`` for ``full``); what ``train_config.yaml`` records.

    Raises:
        UsageError: an unknown method name.
    """
    entry = method_entry(method)
    return {} if entry is None else copy.deepcopy(entry.options(options))


def build_method_config(method: str, options: Mapping[str, Any], task: str) -> AdapterConfig | None:
    """The config object for ``method`` with the user's ``options`` over its defaults; None for ``full``.

    Raises:
        UsageError: an unknown method or option (with the closest known one), or a value the config
            class refuses (e.g. ``r=0``).
    """
    entry = method_entry(method)
    if entry is None:
        if options:
            raise UsageError(f"method 'full' takes no method_options, got {sorted(options)}")
        return None
    known = method_fields(method)
    for key in options:
        if key not in known:
            raise UsageError(
                f"unknown option {key!r} for method {method!r} ({entry.config_class.__name__})"
                f"{closest(key, known, ALIASES)}"
            )
    values = entry.options(options)
    if "task_type" in known:
        values.setdefault("task_type", TASKS[task].task_type)
    try:
        return entry.config_class(**values, **entry.fixed)
    except (TypeError, ValueError) as e:
        raise UsageError(f"method {method!r}: {e}") from e
