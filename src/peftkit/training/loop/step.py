"""One optimizer step: the micro-batches of a global batch, the gradient sync, the update.

The objective's summed loss of each micro-batch is divided by the global batch's count (its rows'
``targets``, known from the data before the step), so any split over processes and micro-batches gives
the gradient of one big batch. Packed rows go in as one sequence per micro-batch, run (forward and
backward) under :func:`~peftkit.objectives.packed.packed_attention`; other rows are padded. A
non-finite loss or gradient norm stops before the update, so the model and the last checkpoint stay
good.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from peftkit.objectives.packed import packed_attention
from peftkit.ops import fused_cross_entropy
from peftkit.training.checkpoints import latest_checkpoint
from peftkit.training.loop.context import RunContext
from peftkit.training.loop.setup import RunSetup
from peftkit.training.sharding import gradient_sync, to_float

__all__ = ["StepOutcome", "loss_mode", "take_step"]


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step did."""

    loss: float  # the objective over the global batch: summed, divided by its count
    grad_norm: float  # before clipping
    tokens: int  # real (not padding) tokens in the global batch (all processes)
    padding: int  # padding tokens computed alongside them
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's own, per row of the batch


def take_step(context: RunContext, setup: RunSetup, step: int) -> StepOutcome | None:
    """Optimizer step ``step + 1`` over this process's micro-batches of global batch ``step``.

    Returns:
        What it did, or None (and no update) when the loss or the gradient norm is not finite.
    """
    config, acc = context.config, context.accelerator
    indices = setup.order.global_batch(step)
    n_targets = sum(setup.targets[i] for i in indices)
    local_loss = torch.zeros((), device=acc.device)
    local_tokens = torch.zeros(2, device=acc.device)  # real, padding
    for j, rows in enumerate(setup.order.micro_batches(indices)):
        batch = setup.collate([setup.train_rows[i] for i in rows])
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        sync = j == config.grad_accum - 1
        with _gradient_sync(context, setup, sync), loss_mode(context), _attention(setup):
            summed, _ = setup.objective(setup.wrapped, batch)
            acc.backward(summed * context.world / n_targets)  # DDP and FSDP2 average over processes
        local_loss += summed.detach()
        size = batch["input_ids"].numel()
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else size
        local_tokens += torch.tensor([real, size - real], device=acc.device)
    norm = to_float(acc.clip_grad_norm_(setup.params, config.max_grad_norm or float("inf")))
    loss = (acc.reduce(local_loss, "sum") / n_targets).item()
    tokens, padding = (int(n) for n in acc.reduce(local_tokens, "sum").tolist())
    metrics = {name: (acc.reduce(value, "sum") / n_targets).item() for name, value in _taken(setup).items()}
    if not (math.isfinite(loss) and math.isfinite(norm)):
        _report_non_finite(context, step + 1, loss, norm)
        return None
    setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss, norm, tokens, padding, metrics)


def _attention(setup: RunSetup) -> Any:
    """Packed rows attend within each example, in the forward and in the backward (which runs the
    layers again under gradient checkpointing)."""
    return packed_attention(setup.model) if setup.data.packed else contextlib.nullcontext()


def _taken(setup: RunSetup) -> dict[str, torch.Tensor]:
    """The objective's metrics summed over this process's rows of the step (preference objectives: the
    reward margin and accuracy), in a fixed order so that every process reduces the same ones."""
    take = getattr(setup.objective, "take_metrics", None)
    return dict(sorted(take().items())) if take is not None else {}


def loss_mode(context: RunContext) -> Any:
    """Under FSDP2 the model's own loss: the fused head loss reads the head's weight outside the
    model's forward, where it is sharded."""
    return fused_cross_entropy(False) if context.sharded else contextlib.nullcontext()


def _gradient_sync(context: RunContext, setup: RunSetup, sync: bool) -> Any:
    """Gradients reduced across processes after this micro-batch (``sync``) or kept local."""
    if context.sharded:
        return gradient_sync(setup.model, sync)
    return contextlib.nullcontext() if sync else context.accelerator.no_sync(setup.wrapped)


def _report_non_finite(context: RunContext, step: int, loss: float, norm: float) -> None:
    last = latest_checkpoint(context.out)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (set save_every)"
    print(
        f"peftkit train: stopped: the loss is {loss} (gradient norm {norm}) at step {step}; the update "
        f"was not applied and {kept}. Lower --lr, keep --max-grad-norm on, or try --dtype float32.",
        file=sys.stderr,
    )
