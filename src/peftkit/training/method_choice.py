"""``--method NAME`` plus options → a method config object, from the method table.

Every entry of :data:`peftkit.methods.METHOD_TABLE` is a method name here; ``full`` (every parameter
trains) needs no config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from peftkit.config import AdapterConfig
from peftkit.errors import UsageError, closest
from peftkit.methods import METHOD_TABLE, Method, method_by_name

__all__ = ["FULL", "METHOD_NAMES", "TASK_TYPES", "build_method_config", "method_entry", "method_fields"]

FULL = "full"
METHOD_NAMES = (*(entry.name for entry in METHOD_TABLE), FULL)
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq2seq-lm": "SEQ_2_SEQ_LM", "seq-cls": "SEQ_CLS"}


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
                f"{closest(key, known)}"
            )
    values = entry.options(options)
    if "task_type" in known:
        values.setdefault("task_type", TASK_TYPES[task])
    try:
        return entry.config_class(**values, **entry.fixed)
    except (TypeError, ValueError) as e:
        raise UsageError(f"method {method!r}: {e}") from e
