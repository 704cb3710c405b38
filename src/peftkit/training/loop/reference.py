"""DPO's reference policy: which one it is (checked before the model loads), and its log-probabilities of
every pair's answers, computed once before the first step.

The reference is the base model with the adapter off, or with ``reference: ADAPTER_DIR`` that adapter
(e.g. an SFT run), which is then also where the trained adapter starts (TRL does the same with a copy of
it). Either way the reference never changes, so its summed answer log-probabilities are computed once,
for the training and the held-out pairs, before the first step (no reference forward in the steps, no
second model, never any logits kept), and written to ``reference_log_probs.safetensors`` in the run
directory: ``--resume`` reads them back, so a resumed run uses the very same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from peftkit.foundation.errors import UsageError
from peftkit.foundation.io import CONFIG_NAME, atomic_write
from peftkit.foundation.loading import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID
from peftkit.model import PeftModel, load
from peftkit.objectives.sequences import sequence_log_probs
from peftkit.training.run_directory import CONFIG_FILE
from peftkit.training.train_config import TrainConfig

if TYPE_CHECKING:
    import datasets

__all__ = [
    "REFERENCE_FILE",
    "check_reference",
    "check_reference_options",
    "load_reference_adapter",
    "reference_log_probs",
    "same_base_model",
    "with_reference_log_probs",
]

REFERENCE_FILE = "reference_log_probs.safetensors"
COLUMNS = ("reference_chosen", "reference_rejected")
REFERENCE_ADAPTER = "reference"  # the reference adapter's name beside a trained one (peftkit eval)


def check_reference_options(config: TrainConfig) -> None:
    """``reference`` sets the adapter to train (its config and values): method options are refused.

    Raises:
        UsageError: method options given with ``reference``.
    """
    if config.reference is not None and config.method_options:
        names = ", ".join(sorted(config.method_options))
        raise UsageError(
            f"reference {config.reference} is also where the trained adapter starts, with its own config; "
            f"leave out the method options ({names})"
        )


def check_reference(config: TrainConfig) -> None:
    """Before the model loads: ``reference`` is an adapter directory trained on ``config.model``.

    Raises:
        UsageError: no adapter there, or one recorded as trained on another base model.
    """
    if config.reference is None:
        return
    directory = Path(config.reference).expanduser()
    if not (directory / CONFIG_NAME).is_file():
        raise UsageError(
            f"reference {config.reference} is not an adapter directory (no {CONFIG_NAME}); pass the "
            "output_dir of a peftkit train run, or another adapter directory"
        )
    recorded = recorded_base_model(directory)
    if recorded and not same_base_model(recorded, config.model):
        raise UsageError(
            f"reference {config.reference} was trained on {recorded}, not on this run's model "
            f"{config.model}; use a reference trained on {config.model}, or --model {recorded}"
        )


def recorded_base_model(directory: Path) -> str | None:
    """The base model an adapter directory records: its run's ``model``, else the adapter config's."""
    import yaml

    if (directory / CONFIG_FILE).is_file():
        model = (yaml.safe_load((directory / CONFIG_FILE).read_text()) or {}).get("model")
        if model:
            return str(model)
    return json.loads((directory / CONFIG_NAME).read_text()).get("base_model_name_or_path") or None


def same_base_model(recorded: str, model: str) -> bool:
    """Whether two names of a base model name the same one (the bundled default by either name, a
    directory by its resolved path)."""
    default = {DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID.lower()}
    if recorded.lower() in default and model.lower() in default:
        return True
    here, there = Path(recorded).expanduser(), Path(model).expanduser()
    if here.exists() and there.exists():
        return here.resolve() == there.resolve()
    return recorded == model


def load_reference_adapter(model: nn.Module, config: TrainConfig) -> PeftModel:
    """``model`` with the reference adapter loaded, trainable: it is where training starts.

    Raises:
        UsageError: the adapter does not fit the model.
    """
    try:
        return load(model, Path(config.reference).expanduser(), is_trainable=True)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"cannot load reference {config.reference}: {e}") from e


@torch.no_grad()
def reference_log_probs(
    model: nn.Module,
    forward: nn.Module,
    rows: Sequence[dict[str, Any]],
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, Tensor]],
    batch_size: int,
    adapters_off: bool,
) -> Tensor:
    """The reference's summed log-probabilities of every pair's two answers.

    Args:
        model: the (unwrapped) model before its first step.
        forward: what runs the batches: ``model`` or its accelerate wrapper (same numerics as training).
        rows: pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``).
        adapters_off: the reference is the base model: adapters disabled for the pass.

    Returns:
        (len(rows), 2) float32: chosen, rejected.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    off = (
        model.disable_adapters()
        if adapters_off and isinstance(model, PeftModel)
        else contextlib.nullcontext()
    )
    out = []
    try:
        with off:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                batch = {k: v.to(device) for k, v in collate(chunk).items()}
                sums, _ = sequence_log_probs(forward, batch)
                out.append(torch.stack(sums.float().cpu().chunk(2), dim=1))  # (pairs, 2)
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 2))


def with_reference_log_probs(
    model: nn.Module,
    rows: datasets.Dataset,
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, Tensor]],
    batch_size: int,
    reference: str | None,
) -> datasets.Dataset:
    """Held-out pairs with the reference's log-probabilities of their answers, scored now (``peftkit
    eval``): the base under ``model``'s adapter (``reference`` None), or the adapter ``reference`` loaded
    beside it for the pass.

    Raises:
        UsageError: the reference adapter cannot be loaded.
    """
    pairs = rows.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
    if reference is None:
        values = reference_log_probs(model, model, pairs, collate, batch_size, adapters_off=True)
    else:
        with _reference_adapter(model, Path(reference).expanduser()) as scorer:
            values = reference_log_probs(scorer, scorer, pairs, collate, batch_size, adapters_off=False)
    return rows.add_column(COLUMNS[0], values[:, 0].tolist()).add_column(COLUMNS[1], values[:, 1].tolist())


@contextlib.contextmanager
def _reference_adapter(model: nn.Module, directory: Path) -> Iterator[nn.Module]:
    """Within the block, a model computing the reference adapter: loaded beside ``model``'s own adapter
    and alone active (or onto the base model), removed again after."""
    try:
        if not isinstance(model, PeftModel):  # the base model alone (peftkit eval --base)
            wrapped = load(model, directory)
        else:
            previous = model.active_adapters
            model.load_adapter(directory, adapter_name=REFERENCE_ADAPTER)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"cannot load reference {directory}: {e}") from e
    if not isinstance(model, PeftModel):
        try:
            yield wrapped
        finally:
            wrapped.unload()
        return
    model.set_adapter(REFERENCE_ADAPTER)
    try:
        yield model
    finally:
        model.set_adapter(previous)
        model.delete_adapter(REFERENCE_ADAPTER)


def fingerprint(rows: Sequence[dict[str, Any]], config: TrainConfig) -> str:
    """A hash of ``rows`` (the pairs' tokens, and anything else that must match) and of what decides the
    reference (model, reference adapter, dtype, quantization)."""
    digest = hashlib.sha256(
        json.dumps([config.model, config.reference, config.dtype, config.quantize]).encode()
    )
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def read_saved(path: Path, key: str) -> dict[str, Tensor] | None:
    """The saved log-probabilities if ``path`` holds them for ``key`` (a :func:`fingerprint`), else None."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as saved:
        if (saved.metadata() or {}).get("fingerprint") != key:
            return None
    return load_file(str(path))


def write_saved(path: Path, tensors: dict[str, Tensor], key: str) -> None:
    """Write ``tensors`` with the ``key`` they belong to (atomically)."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"fingerprint": key}))
