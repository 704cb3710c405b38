"""What ``peftkit export SOURCE`` opens: a run or adapter directory (the base model with the adapter), a
transformers model directory, or a model name (the bundled SmolLM2, a Hugging Face id), with the prompt
settings a run recorded.

Bases load unquantized in float32 whatever the run trained on: an adapter trained on a 4-bit base is
exported merged into the float base it was made from (as its file loads in either library), not into
the rounded 4-bit weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.foundation.errors import UsageError
from peftkit.foundation.io import CONFIG_NAME
from peftkit.foundation.loading import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, load_model
from peftkit.model import load
from peftkit.training.runs import is_recorded, run_config

__all__ = ["Source", "open_source"]

_MODEL_CONFIG = "config.json"


@dataclass
class Source:
    """An opened SOURCE.

    Attributes:
        model: a ``PeftModel`` with the adapter active, or a plain transformers model; eval mode, float32.
        tokenizer: its tokenizer.
        name: a short name for the files (the directory's or the model's).
        adapter: the adapter's name in ``model``, None for a plain model.
        system_prompt, prompt_template: what the run prompted with (None where it records none).
        trained_quantized: the quantization the run trained on (``"nf4"`` …), None if it did not.
    """

    model: nn.Module
    tokenizer: Any
    name: str
    adapter: str | None = None
    system_prompt: str | None = None
    prompt_template: str | None = None
    trained_quantized: str | None = None


def open_source(source: str | Path, model: str | None = None) -> Source:
    """Open SOURCE for export (``model``: the base model, replacing the recorded one).

    Raises:
        UsageError: a path that does not exist or holds neither an adapter nor a model, an adapter that
            records no base (and no ``model``), a base that cannot be loaded, an adapter that does not fit
            its base, or a task other than causal language modelling.
    """
    path = Path(source).expanduser()
    if not path.is_dir():
        if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
            raise UsageError(f"SOURCE {source} is not a directory; pass a run, adapter or model directory")
        try:
            return Source(*_load_base(str(source)), name=Path(str(source)).name)
        except UsageError as e:
            raise UsageError(
                f"SOURCE {source} is no run, adapter or model directory, and no model that loads ({e})"
            ) from e
    config = run_config(path, model)
    if config.task != "causal-lm":
        raise UsageError(f"{path} is a {config.task} model; only causal language models export to GGUF")
    quantized = None if config.quantize in (None, "none") else config.quantize
    settings = {"system_prompt": config.system_prompt, "prompt_template": config.prompt_template}
    if not (path / CONFIG_NAME).is_file():  # a whole model: a merge, a full fine-tuning run, a base
        base, tokenizer = _load_base(str(path) if model is None else model)
        return Source(base, tokenizer, name=path.resolve().name, **settings)
    if model is None and not is_recorded(path) and not _recorded_base(path):
        raise UsageError(
            f"{path / CONFIG_NAME} records no base model (base_model_name_or_path); pass --model BASE"
        )
    base, tokenizer = _load_base(config.model)
    try:
        wrapped = load(base, path)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"cannot load the adapter in {path} onto {config.model}: {_first_line(e)}") from e
    adapter = wrapped.active_adapters[0]
    return Source(
        wrapped.eval(),
        tokenizer,
        name=path.resolve().name,
        adapter=adapter,
        trained_quantized=quantized,
        **settings,
    )


def _recorded_base(path: Path) -> str | None:
    try:
        return json.loads((path / CONFIG_NAME).read_text()).get("base_model_name_or_path") or None
    except (OSError, json.JSONDecodeError):
        return None


def _load_base(name: str) -> tuple[nn.Module, Any]:
    """A base model, float32 and unquantized, with its tokenizer."""
    name = DEFAULT_MODEL if name == DEFAULT_MODEL_HUB_ID else name
    try:
        model, tokenizer = load_model(name, task="causal-lm", dtype="float32")
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UsageError(f"cannot load the base model {name!r}: {_first_line(e)}") from e
    if tokenizer is None:
        raise UsageError(f"model {name!r} has no tokenizer files; GGUF needs the tokenizer")
    return model, tokenizer


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
