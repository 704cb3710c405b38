"""Opening what ``peftkit train`` wrote (or any adapter / model directory) for eval, generate and merge."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.errors import UsageError
from peftkit.io import CONFIG_NAME
from peftkit.model import load
from peftkit.training.config import TrainConfig, load_config
from peftkit.training.loop import CONFIG_FILE, load_base_model

__all__ = ["apply_prompt_template", "load_run", "run_config"]

_TASKS_BY_TYPE = {"CAUSAL_LM": "causal-lm", "SEQ_2_SEQ_LM": "seq2seq-lm", "SEQ_CLS": "seq-cls"}


def run_config(path: str | Path, model: str | None = None) -> TrainConfig:
    """The settings a run was trained with: its ``train_config.yaml``, else read from the adapter.

    Args:
        path: a run directory, an adapter directory, or a full model directory.
        model: use this base model instead of the recorded one.

    Raises:
        UsageError: ``path`` does not exist or holds neither an adapter nor a model.
    """
    path = Path(path)
    if not path.is_dir():
        raise UsageError(
            f"{path} is not a directory; pass the output_dir of peftkit train or an adapter directory"
        )
    overrides: dict[str, Any] = {"output_dir": str(path)}
    if (path / CONFIG_FILE).is_file():
        config = load_config(path / CONFIG_FILE, overrides)
    elif (path / CONFIG_NAME).is_file():
        adapter = json.loads((path / CONFIG_NAME).read_text())
        if adapter.get("base_model_name_or_path"):
            overrides["model"] = adapter["base_model_name_or_path"]
        if adapter.get("task_type") in _TASKS_BY_TYPE:
            overrides["task"] = _TASKS_BY_TYPE[adapter["task_type"]]
        config = load_config(None, overrides)
    elif (path / "config.json").is_file():
        config = load_config(None, {**overrides, "model": str(path), "method": "full"})
    else:
        raise UsageError(f"{path} holds no {CONFIG_NAME} (adapter) or config.json (model)")
    return config if model is None else config.replace(model=model)


def load_run(
    path: str | Path, model: str | None = None, adapter: bool = True
) -> tuple[nn.Module, Any, TrainConfig]:
    """Load a run's model: the base model with the run's adapter (``adapter=False``: the base alone).

    A full fine-tuning run (a model directory) loads as that model; ``adapter=False`` then gives the
    base model it started from.

    Returns:
        ``(model, tokenizer, config)``, the model in eval mode.
    """

    path = Path(path)
    config = run_config(path, model)
    has_adapter = (path / CONFIG_NAME).is_file()
    if config.method == "full" and adapter and model is None and (path / "config.json").is_file():
        config_for_load = config.replace(model=str(path))
    else:
        config_for_load = config
    base, tokenizer = load_base_model(config_for_load)
    if adapter and has_adapter:
        try:
            base = load(base, path)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"cannot load the adapter in {path}: {e}") from e
    return base.eval(), tokenizer, config


def apply_prompt_template(template: str | None, text: str) -> str:
    """Put ``text`` into a run's ``prompt_template`` when the template has exactly one field."""
    if not template:
        return text
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    if len(fields) != 1:
        return text
    return template.format(**{fields.pop(): text})
