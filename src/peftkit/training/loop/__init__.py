"""The training loop of ``peftkit train``, on ``accelerate`` (one process, or DDP under ``torchrun``).

:func:`train` runs the parts in order, each in its own module:

1. set up (:mod:`~peftkit.training.loop.setup`): check the settings, the output directory, the method,
   optimizer and data; load and wrap the model; build the optimizer and schedule
   (:mod:`peftkit.training.optimization`); create the run directory
   (:mod:`peftkit.training.run_directory`);
2. resume (:mod:`~peftkit.training.loop.state`): a fresh state, or the latest checkpoint's;
3. train steps (:class:`_Steps`; one step: :mod:`~peftkit.training.loop.step`, its rows:
   :mod:`~peftkit.training.loop.order`, Ctrl-C: :mod:`~peftkit.training.loop.signals`);
4. evaluate (:mod:`~peftkit.training.loop.scoring`) before, every ``eval_every`` steps and after;
5. save: checkpoints every ``save_every`` steps and the final adapter (:mod:`~peftkit.training.loop.state`);
6. summarize (:mod:`~peftkit.training.loop.summary`).

Each optimizer step takes a global batch of ``batch_size x grad_accum x processes`` rows from a seeded
per-epoch permutation; every process takes its own micro-batches of it. The loss is summed over answer
tokens and divided by the global batch's answer-token count (known from the data before the step), so
any split of the batch over processes and micro-batches gives the same gradient as one process.
Checkpoints allow ``--resume`` to continue exactly. Ctrl-C finishes the current step, saves a
checkpoint and stops; a non-finite loss or gradient stops before the update, so the last checkpoint
stays good.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftkit.foundation.errors import UsageError
from peftkit.training.checkpoints import rng_state
from peftkit.training.data import with_labels
from peftkit.training.loop.context import THREAD_CHECK_EVERY, RunContext, set_threads
from peftkit.training.loop.reference import check_reference_options
from peftkit.training.loop.reference_pass import attach_reference_log_probs
from peftkit.training.loop.scoring import evaluate_run
from peftkit.training.loop.setup import RunSetup, set_up
from peftkit.training.loop.signals import StopFlag, stop_requested
from peftkit.training.loop.state import LoopState, save_final, save_step, start_state
from peftkit.training.loop.step import StepOutcome, take_step
from peftkit.training.loop.summary import finish, progress_bar
from peftkit.training.method_choice import resolved_options
from peftkit.training.objective_settings import with_objective_defaults
from peftkit.training.reports import MetricsLog
from peftkit.training.result import TrainResult
from peftkit.training.train_config import TrainConfig, with_task_defaults

__all__ = ["TrainResult", "train"]

OnStep = Callable[[int, float, nn.Module], None]
_SHORT = {"reward_margin": "margin", "reward_accuracy": "acc"}  # the progress bar's names


def train(config: TrainConfig, on_step: OnStep | None = None, evaluate_before: bool = True) -> TrainResult:
    """Run the training job ``config`` describes and write its outputs to ``config.output_dir``.

    Args:
        config: the run's settings.
        on_step: called on the main process after every optimizer step with ``(step, loss, model)``
            (the unwrapped model), before that step's checkpoint; for tools and tests.
        evaluate_before: score the held-out rows before training (``peftkit compare`` scores the base
            model once instead of once per method).

    Raises:
        UsageError: bad input (data file, column, model, method option, an existing output_dir
            without ``overwrite``…), found before anything is written.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if config.estimate_only:
        raise UsageError(
            "estimate_only is for the command line (peftkit train --estimate-only); in Python call "
            "peftkit.estimate(model, method=..., batch=..., seq=...)"
        )
    # accelerate runs several CPU processes (gloo) only when told to use the CPU
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if config.bf16 else "no", cpu=multi_cpu)
    try:
        return _run(RunContext.create(_resolved(config), accelerator), on_step, evaluate_before)
    finally:
        if accelerator.num_processes > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)  # allow another run in this process


def _resolved(config: TrainConfig) -> TrainConfig:
    """``config`` as the run uses it: the bundled task's settings, the objective's and the method's
    default options and a classifier's labels in (so ``train_config.yaml`` records what really trained,
    not ``method_options: {}``, and every command reloads a classifier with its head's size and names).
    With a DPO ``reference`` the adapter is that one: its config is in its files."""
    config = with_labels(with_objective_defaults(with_task_defaults(config)))
    if config.reference is not None:
        check_reference_options(config)
        return config
    return config.replace(method_options=resolved_options(config.method, config.method_options))


def _run(context: RunContext, on_step: OnStep | None, evaluate_before: bool) -> TrainResult:
    """Set up, resume, train steps, evaluate, save, summarize."""
    setup = set_up(context)
    attach_reference_log_probs(context, setup)  # before a checkpoint changes the model
    state = start_state(context, setup)
    log = MetricsLog(context.out) if context.main else None
    if not context.config.resume and evaluate_before:
        state.before = evaluate_run(context, setup, 0, log, "before training")
    _Steps(context, setup, state, log, on_step).run()
    after: dict[str, Any] = {}
    if state.stopped is None:
        save_final(context, setup)
        after = evaluate_run(context, setup, state.step, log, "after training")
    return finish(context, setup, state, after, log)


class _Steps:
    """The optimizer steps of a run, until ``total_steps``, Ctrl-C or a non-finite loss, and what follows
    each: progress, metrics, ``on_step``, stopping, checkpoints, CPU threads, evaluation."""

    def __init__(
        self,
        context: RunContext,
        setup: RunSetup,
        state: LoopState,
        log: MetricsLog | None,
        on_step: OnStep | None,
    ) -> None:
        self.context, self.setup, self.state, self.log, self.on_step = context, setup, state, log, on_step
        self.bar: Any = None

    def run(self) -> None:
        """Take steps from ``state.step`` on; ``state`` says where they stopped and why."""
        state, setup = self.state, self.setup
        self.bar = progress_bar(self.context, setup.total_steps, state.step)
        setup.wrapped.train()
        with StopFlag() as stop:
            while state.step < setup.total_steps and state.stopped is None:
                tick = time.perf_counter()
                outcome = take_step(self.context, setup, state.step)
                if outcome is None:
                    state.stopped = "non-finite"
                    break
                self._record(outcome, time.perf_counter() - tick)
                self._after_step(stop)
        self.bar.close()

    def _record(self, outcome: StepOutcome, seconds: float) -> None:
        """Count the step in the state, the progress bar and ``metrics.jsonl``."""
        state, setup = self.state, self.setup
        state.step += 1
        state.rng = rng_state()
        state.train_time += seconds
        state.tokens_seen += outcome.tokens
        state.padding_seen += outcome.padding
        state.losses.append(outcome.loss)
        self.bar.update(1)
        shown = {_SHORT.get(name, name): f"{value:.3g}" for name, value in outcome.metrics.items()}
        self.bar.set_postfix(
            loss=f"{outcome.loss:.4f}",
            **shown,
            tok_s=f"{state.tokens_seen / max(state.train_time, 1e-9):.0f}",
        )
        step = state.step
        if self.log is not None and (step % self.context.config.log_every == 0 or step == setup.total_steps):
            self.log.write(
                {
                    "step": step,
                    "split": "train",
                    "loss": outcome.loss,
                    "lr": setup.scheduler.get_last_lr()[0],  # the base rate (optimization.py)
                    "grad_norm": outcome.grad_norm,
                    "tokens_per_s": outcome.tokens / max(seconds, 1e-9),
                    "padding_tokens": outcome.padding,
                    **outcome.metrics,
                }
            )
        if self.on_step is not None and self.context.main:
            self.on_step(step, outcome.loss, setup.model)

    def _after_step(self, stop: StopFlag) -> None:
        """Stop on Ctrl-C (with a checkpoint), else checkpoint, recheck threads and evaluate when due."""
        context, setup, state = self.context, self.setup, self.state
        config, step = context.config, state.step
        if stop_requested(context, stop.requested):  # read after on_step, which may have pressed Ctrl-C
            # under FSDP2 a checkpoint would hold rank 0's shards only: none is written (sharding.py)
            state.checkpoint = None if context.sharded else save_step(context, setup, state)
            state.stopped = "interrupted"
            return
        if config.save_every and (step % config.save_every == 0 or step == setup.total_steps):
            state.checkpoint = save_step(context, setup, state)
        if step % THREAD_CHECK_EVERY == 0 and not config.threads:
            set_threads(context, running=torch.get_num_threads())
        if config.eval_every and step % config.eval_every == 0 and step < setup.total_steps:
            evaluate_run(context, setup, step, self.log, f"step {step}", self.bar)
