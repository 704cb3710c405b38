"""Training checkpoints: everything needed to continue a run exactly, written atomically.

``output_dir/checkpoints/step-000040/`` holds the trainable parameters (``trainable.safetensors``, by
parameter name), the optimizer and scheduler states, each process's random-number-generator state
(``rng-<rank>.pt``), ``state.json`` (step, metrics before training, elapsed time) and, for adapter
methods, the adapter in Hugging Face PEFT's layout. It is written into a temporary directory that is
renamed into place once complete, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from peftkit.foundation.errors import UsageError
from peftkit.foundation.io import atomic_write, publish_directory, read_tensors

__all__ = [
    "CHECKPOINTS",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_rng",
    "rng_state",
    "save_checkpoint",
]

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
PARAMS_FILE = "trainable.safetensors"


def rng_state() -> dict[str, Any]:
    """This process's Python and torch (CPU, CUDA) random states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`rng_state`."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached, on the CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: dict[str, Any],
    state: dict[str, Any],
    keep: int,
    barrier: Callable[[], None],
    rank: int,
    save_model: Callable[[Path], None] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` (every process calls this; rank 0 writes the shared files).

    Args:
        model: the unwrapped model; its trainable parameters are saved.
        rng: this process's random state as it was right after ``step`` (see :func:`rng_state`).
        state: JSON-ready run state saved as ``state.json`` (``step`` is added).
        keep: how many checkpoints to keep; older ones are deleted.
        barrier: waits for every process (a no-op in a single process).
        save_model: writes the adapter (or model) files into a directory, for users.

    Returns:
        The checkpoint directory.
    """
    root = output_dir / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng, tmp / f"rng-{rank}.pt")
    barrier()
    if rank == 0:
        state_tensors = trainable_state(model)  # atomic_write: safetensors alone makes the file 0600
        atomic_write(tmp / PARAMS_FILE, lambda path: save_file(state_tensors, str(path)))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if save_model is not None:
            save_model(tmp / "adapter")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
        publish_directory(tmp, final, replace=True)  # replace: a re-run of the same step after a resume
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, or None."""
    done = [p for p in sorted((output_dir / CHECKPOINTS).glob("step-*")) if (p / STATE_FILE).is_file()]
    return done[-1] if done else None


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint into ``model`` (unwrapped), ``optimizer`` and ``scheduler``.

    Returns:
        ``(state, rng)``: the saved ``state.json`` and this process's random state, which the caller
        restores right before the next step.

    Raises:
        UsageError: a file of the checkpoint is damaged (named, with the way back: delete the checkpoint
            to resume from the one before), the checkpoint's parameters do not match the model's
            trainable ones, or it was written by a different number of processes.
    """
    try:
        params = read_tensors(path / PARAMS_FILE)
    except UsageError as error:
        raise UsageError(f"{error}; {_way_back(path)}") from error
    own = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(own):
        missing, extra = sorted(set(own) - set(params)), sorted(set(params) - set(own))
        raise UsageError(
            f"checkpoint {path} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
            "was it written with another model or method?"
        )
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(params[name].to(param.dtype))
    optimizer.load_state_dict(_read_torch(path / "optimizer.pt"))
    scheduler.load_state_dict(_read_torch(path / "scheduler.pt"))
    rng_file = path / f"rng-{rank}.pt"
    if not rng_file.is_file():
        raise UsageError(
            f"checkpoint {path} has no random state for process {rank}: resume with as many processes"
        )
    rng = _read_torch(rng_file, weights_only=False)  # our own file: Python's random state is a tuple
    return json.loads((path / STATE_FILE).read_text()), rng


def _read_torch(file: Path, weights_only: bool = True) -> Any:
    """A ``torch.save`` file of a checkpoint; a damaged one is a :class:`UsageError` naming it."""
    try:
        return torch.load(file, weights_only=weights_only)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        reason = (
            str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        )
        raise UsageError(f"{file} is damaged ({reason}); {_way_back(file.parent)}") from error


def _way_back(checkpoint: Path) -> str:
    return f"delete {checkpoint} to resume from the checkpoint before it, or start over with --overwrite"
