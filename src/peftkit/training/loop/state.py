"""Where a run stands, and what it saves: resuming from a checkpoint, writing one, the final adapter.

A checkpoint (:mod:`peftkit.training.checkpoints`) holds the trainable parameters, optimizer, scheduler,
each process's random state right after its step, and ``before``, ``train_time``, ``tokens_seen``,
``padding_seen``, the wall time and the number of sessions so far (:class:`LoopState`); the data order
needs only the step number (:mod:`~peftkit.training.loop.order`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.foundation.io import save_pretrained
from peftkit.model import PeftModel
from peftkit.training.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from peftkit.training.loop.context import RunContext
from peftkit.training.loop.setup import RunSetup
from peftkit.training.reports import METRICS_FILE, truncate_metrics
from peftkit.training.sharding import full_parameters, with_full_state_dict

__all__ = ["LoopState", "save_final", "save_step", "start_state", "wall_time"]


@dataclass
class LoopState:
    """Where the run stands; ``before``, ``train_time``, ``tokens_seen``, ``padding_seen``, the wall time
    (:func:`wall_time`) and ``sessions`` go into each checkpoint. Times count every session since step 0."""

    step: int = 0
    first_step: int = 0
    before: dict[str, Any] = field(default_factory=dict)
    train_time: float = 0.0  # seconds in optimizer steps (no evaluation, no saving)
    tokens_seen: int = 0  # real tokens trained on
    padding_seen: int = 0  # padding tokens computed alongside them
    earlier_wall_time: float = 0.0  # seconds the sessions before this one ran, up to the checkpoint resumed
    sessions: int = 1  # this process's run and the ones it resumed
    losses: list[float] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)  # the random state right after the last step
    checkpoint: Path | None = None
    stopped: str | None = None  # None, "interrupted" or "non-finite"


def start_state(context: RunContext, setup: RunSetup) -> LoopState:
    """A fresh state, or with ``resume`` the latest checkpoint's: model, optimizer and scheduler loaded,
    ``metrics.jsonl`` cut back to its step, the random state restored."""
    state = LoopState()
    if context.config.resume:
        checkpoint = latest_checkpoint(context.out)
        saved, rng = load_checkpoint(checkpoint, setup.model, setup.optimizer, setup.scheduler, context.rank)
        state = LoopState(
            step=saved["step"],
            first_step=saved["step"],
            before=saved["before"],
            train_time=saved["train_time"],
            tokens_seen=saved["tokens_seen"],
            padding_seen=saved.get("padding_seen", 0),  # absent from checkpoints before packing
            # a checkpoint of older peftkit has no wall time: its training time is the closest bound
            earlier_wall_time=saved.get("wall_time", saved["train_time"]),
            sessions=saved.get("sessions", 1) + 1,
            checkpoint=checkpoint,
        )
        if context.main:
            truncate_metrics(context.out / METRICS_FILE, state.step)
        context.say(f"resuming from {checkpoint} (step {state.step})")
        restore_rng(rng)
    state.rng = rng_state()
    return state


def wall_time(context: RunContext, state: LoopState) -> float:
    """Seconds the run has taken so far, over all its sessions (as its ``train_time`` counts them)."""
    return state.earlier_wall_time + time.perf_counter() - context.start


def save_step(context: RunContext, setup: RunSetup, state: LoopState) -> Path:
    """Write the checkpoint of ``state.step`` (every process calls this); returns its directory."""
    model = setup.model
    return save_checkpoint(
        context.out,
        state.step,
        model=model,
        optimizer=setup.optimizer,
        scheduler=setup.scheduler,
        rng=state.rng,
        state={
            "before": state.before,
            "train_time": state.train_time,
            "tokens_seen": state.tokens_seen,
            "padding_seen": state.padding_seen,
            "wall_time": wall_time(context, state),
            "sessions": state.sessions,
        },
        keep=context.config.keep_checkpoints,
        barrier=context.wait_for_everyone,
        rank=context.rank,
        save_model=model.save_pretrained if isinstance(model, PeftModel) else None,
    )


def save_final(context: RunContext, setup: RunSetup) -> None:
    """Write the trained adapter (or, for full fine-tuning, the whole model and tokenizer) into the run
    directory; under FSDP2 the parameters are gathered first."""
    model = setup.model
    if hasattr(model, "peft_config"):
        with full_parameters(model) if context.sharded else contextlib.nullcontext():
            if context.main:
                model.save_pretrained(context.out)
            context.wait_for_everyone()
        return
    # full fine-tuning: a complete model directory, files with the umask's mode
    saveable = with_full_state_dict(model) if context.sharded else model
    if context.main:
        save_pretrained([saveable, setup.tokenizer], context.out)
    context.wait_for_everyone()
