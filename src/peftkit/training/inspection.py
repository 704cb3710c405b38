"""``peftkit inspect``: a model's modules, what a method config would adapt, the trainable parameters."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.foundation.errors import UsageError
from peftkit.foundation.formatting import format_table
from peftkit.methods.default_targets import target_rule
from peftkit.model import wrap
from peftkit.training.method_choice import build_method_config
from peftkit.training.reports import trainable_table
from peftkit.training.train_config import TrainConfig

__all__ = ["inspect_model", "module_table"]


def module_table(model: nn.Module, pattern: str | None = None) -> str:
    """One row per leaf module: name, type, weight shape, parameter count (``pattern``: a name regex)."""
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as e:
        raise UsageError(f"--filter {pattern!r} is not a valid regular expression: {e}") from e
    rows = []
    for name, module in model.named_modules():
        if not name or any(True for _ in module.children()) or (regex and not regex.search(name)):
            continue
        weight = getattr(module, "weight", None)
        shape = "x".join(map(str, weight.shape)) if weight is not None and hasattr(weight, "shape") else "-"
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append([name, type(module).__name__, shape, params])
    if not rows:
        return f"no module name matches {pattern!r}"
    return format_table(rows, header=["module", "type", "weight", "params"])


def inspect_model(config: TrainConfig, pattern: str | None = None, list_modules: bool = True) -> str:
    """The report ``peftkit inspect`` prints for ``config``'s model and method.

    Raises:
        UsageError: an unavailable method, a bad option, a config that targets nothing, or a model
            that cannot be loaded.
    """
    from peftkit.training.run_directory import load_base_model

    method_config = build_method_config(config.method, config.method_options, config.task)
    model, _ = load_base_model(config)
    parts = [f"model: {config.model} ({type(model).__name__})"]
    if list_modules:
        parts.append(module_table(model, pattern))
    if method_config is None:
        model.requires_grad_(True)
        parts.append("method full: every parameter trains")
    else:
        try:
            model = wrap(model, method_config)
        except ValueError as e:
            raise UsageError(f"method {config.method!r}: {e}") from e
        targets = [name for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
        shown = "\n".join(f"  {name.removeprefix('model.')}" for name in targets)
        parts.append(
            f"method {config.method}: {type(method_config).__name__} adapts {len(targets)} modules\n{shown}"
        )
        chosen = model.peft_config["default"]
        if method_config.target_modules is None and chosen.target_modules is not None:
            feedforward = getattr(chosen, "feedforward_modules", None)
            also = f"; feedforward_modules: {_spelled(feedforward)}" if feedforward else ""
            parts.append(
                f"target_modules (not given): {_spelled(chosen.target_modules)}{also}; chosen by "
                f"{target_rule(model.model)}"
            )
    parts.append(trainable_table(model))
    return "\n\n".join(parts)


def _spelled(target_modules: str | Sequence[str]) -> str:
    return target_modules if isinstance(target_modules, str) else ", ".join(target_modules)
