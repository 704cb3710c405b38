"""A run directory, as ``peftkit train`` writes it: its settings file, its base model, its policy.

``output_dir`` holds, once a run is done:

- ``train_config.yaml`` (:data:`CONFIG_FILE`): the resolved settings (:class:`TrainConfig`), written
  before the first step; what ``eval``, ``generate``, ``merge`` and ``--resume`` read back;
- the adapter (``adapter_config.json``, ``adapter_model.safetensors``) or, for ``full``, a whole model;
- ``metrics.jsonl``, ``loss.png`` (:mod:`~peftkit.training.reports`) and ``summary.json``
  (:data:`SUMMARY_FILE`);
- ``checkpoints/step-NNNNNN/`` (:mod:`~peftkit.training.checkpoints`).

This module is the writing side (may this directory be (re)used, create it, record the settings) and
:func:`load_base_model`, the one loader of a config's base model. Opening a finished run (its
``TrainConfig``, base model and adapter) is :mod:`peftkit.training.runs` (``run_config``, ``load_run``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from peftkit.foundation.errors import UsageError
from peftkit.foundation.io import atomic_write, check_overwrite, remove_path
from peftkit.training.checkpoints import latest_checkpoint
from peftkit.training.method_choice import resolved_options
from peftkit.training.train_config import TrainConfig

__all__ = [
    "CONFIG_FILE",
    "RESUMABLE_CHANGES",
    "SUMMARY_FILE",
    "base_model_config",
    "check_output_dir",
    "load_base_model",
    "prepare_output_dir",
    "write_summary",
]

CONFIG_FILE = "train_config.yaml"
SUMMARY_FILE = "summary.json"
# Keys that may change between a run and its --resume; any other change would make it another run.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "overwrite",
        "threads",
        "max_steps",
        "epochs",
        "eval_every",
        "eval_examples",
        "validation_rows",
        "max_new_tokens",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "output_dir",
        "estimate_only",
    }
)


def load_base_model(config: TrainConfig) -> tuple[nn.Module, Any]:
    """The base model and tokenizer of ``config`` (``model``, ``task``, ``dtype``, ``quantize``; for
    ``seq-cls`` its ``labels``: a classification head with one output per label, named in the config).

    Raises:
        UsageError: the model cannot be found or read, or it has no tokenizer.
    """
    from peftkit.foundation.loading import load_model

    quantize = None if config.quantize == "none" else config.quantize
    try:
        model, tokenizer = load_model(
            _model_name(config),
            task=config.task,
            dtype=config.dtype,
            quantize=quantize,
            quantization_options=config.quantize_options if quantize else None,
            labels=config.labels if config.task == "seq-cls" else None,
        )
    except UsageError:
        raise  # already says what to do (e.g. the install command bitsandbytes needs)
    except (FileNotFoundError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load model {config.model!r}: {first}") from e
    if tokenizer is None:
        raise UsageError(f"model {config.model!r} has no tokenizer files; add them to that directory")
    return model, tokenizer


def base_model_config(config: TrainConfig) -> Any:
    """The transformers config of ``config.model`` as its checkpoint has it (before ``labels``)."""
    from peftkit.foundation.loading import model_config

    return model_config(_model_name(config))


def _model_name(config: TrainConfig) -> str:
    """``config.model`` as :func:`~peftkit.foundation.loading.load_model` takes it."""
    from peftkit.foundation.loading import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID

    return DEFAULT_MODEL if config.model == DEFAULT_MODEL_HUB_ID else config.model


def check_output_dir(config: TrainConfig) -> None:
    """Whether ``config.output_dir`` may be used: empty (or ``overwrite``), or, with ``resume``, holding
    a checkpoint of a run with the same settings (bar :data:`RESUMABLE_CHANGES`). Writes nothing.

    Raises:
        UsageError: what is in the way, and how to get past it.
    """
    out = Path(config.output_dir)
    if not config.resume:
        check_overwrite(
            out, config.overwrite, "output_dir", ", --resume to continue it, or choose another --output-dir"
        )
        return
    if latest_checkpoint(out) is None:
        raise UsageError(f"--resume: no checkpoint in {out}/checkpoints; train with save_every > 0 first")
    saved = out / CONFIG_FILE
    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text()) or {}
    if before.get("method") == config.method:  # a file of older peftkit: options unresolved
        before["method_options"] = resolved_options(config.method, before.get("method_options") or {})
    # keys newer than the file: their defaults; labels, which the data gives when unset: as now
    before = {**TrainConfig().to_dict(), "labels": config.labels, **before}
    now = config.to_dict()
    changed = [k for k in now if k not in RESUMABLE_CHANGES and before[k] != now[k]]
    if changed:
        key = changed[0]
        raise UsageError(
            f"--resume: {key} was {before[key]!r} in {saved} but is {now[key]!r} now; "
            "resume with the same settings (or start over with --overwrite)"
        )


def prepare_output_dir(config: TrainConfig) -> Path:
    """Create ``config.output_dir`` (emptied first with ``overwrite``) and, unless resuming, record the
    settings in ``train_config.yaml`` (atomically). Call after :func:`check_output_dir`, on one process.

    Returns:
        The directory.
    """
    out = Path(config.output_dir)
    if config.overwrite and out.exists():
        remove_path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not config.resume:
        text = yaml.safe_dump(config.to_dict(), sort_keys=False)
        atomic_write(out / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return out


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """Write a finished run's ``summary.json`` (atomically)."""
    atomic_write(out / SUMMARY_FILE, lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
