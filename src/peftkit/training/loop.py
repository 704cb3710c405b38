"""The training loop of ``peftkit train``, on ``accelerate`` (one process, or DDP under ``torchrun``).

Each optimizer step takes a global batch of ``batch_size x grad_accum x processes`` rows from a seeded
per-epoch permutation; every process takes its own micro-batches of it. The loss is summed over answer
tokens and divided by the global batch's answer-token count (known from the data before the step), so
any split of the batch over processes and micro-batches gives the same gradient as one process.

Evaluation (loss/perplexity and generation metrics) runs before training, every ``eval_every`` steps
and after training; checkpoints every ``save_every`` steps allow ``--resume`` to continue exactly.
Ctrl-C finishes the current step, saves a checkpoint and stops; a non-finite loss or gradient stops
before the update, so the last checkpoint stays good.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.core.whole_model import is_model_level
from peftkit.foundation.errors import UsageError
from peftkit.foundation.io import save_pretrained
from peftkit.loss import loss_sum
from peftkit.model import PeftModel, count_parameters, wrap
from peftkit.ops import fused_cross_entropy
from peftkit.training.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from peftkit.training.data import PreparedData, check_data, collate, prepare_data
from peftkit.training.evaluation import evaluate, headline_metric, pad_token_id
from peftkit.training.method_choice import build_method_config, method_entry, resolved_options
from peftkit.training.optimization import build_optimizer, build_scheduler, check_optimizer
from peftkit.training.reports import (
    METRICS_FILE,
    PLOT_FILE,
    MetricsLog,
    peak_memory,
    plot_losses,
    read_metrics,
    summarize,
    trainable_table,
    truncate_metrics,
)
from peftkit.training.result import TrainResult
from peftkit.training.run_directory import (
    CONFIG_FILE,
    check_output_dir,
    load_base_model,
    prepare_output_dir,
    write_summary,
)
from peftkit.training.sharding import (
    check_shardable,
    full_parameters,
    gradient_sync,
    shard,
    to_float,
    with_full_state_dict,
)
from peftkit.training.train_config import TrainConfig, with_task_defaults

__all__ = ["TrainResult", "train"]

THREAD_CHECK_EVERY = 10  # steps between looks at the machine's load (threads: 0)


def auto_threads(running: int, processes: int = 1) -> int:
    """CPU threads for each of this run's processes: the cores that other programs leave free.

    Other programs' load is the 1-minute load average less this run's own ``running`` threads. On a
    shared machine this matters: two threads fighting another busy process for two cores made a
    SmolLM2 training step 4-6x slower than one thread (measured), as OpenMP threads wait on each other.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    others = max(0.0, os.getloadavg()[0] - running)
    return max(1, round(cores - others) // processes)


class _StopFlag:
    """Ctrl-C asks the loop to stop after the current step; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again aborts now)",
            file=sys.stderr,
        )

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(
    config: TrainConfig,
    on_step: Callable[[int, float, nn.Module], None] | None = None,
    evaluate_before: bool = True,
) -> TrainResult:
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
        return _Run(_resolved(config), accelerator, on_step, evaluate_before).run()
    finally:
        if accelerator.num_processes > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)  # allow another run in this process


def _resolved(config: TrainConfig) -> TrainConfig:
    """``config`` as the run uses it: the bundled task's settings and the method's default options in
    (so ``train_config.yaml`` records what really trained, not ``method_options: {}``)."""
    config = with_task_defaults(config)
    return config.replace(method_options=resolved_options(config.method, config.method_options))


@dataclass
class _Setup:
    """What the steps work on, fixed once the run is set up."""

    model: nn.Module  # unwrapped: saved, evaluated, passed to on_step
    wrapped: nn.Module  # accelerate's (DDP) wrapper: the forward and backward go through it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[nn.Parameter]  # the trainable ones, for gradient clipping
    data: PreparedData
    train_rows: list[dict[str, Any]]  # input_ids and labels of every training row
    targets: list[int]  # answer tokens per training row
    pad_id: int
    total_steps: int
    steps_per_epoch: int
    metric: str


@dataclass
class _LoopState:
    """Where the run stands; ``before``, ``train_time`` and ``tokens_seen`` go into each checkpoint."""

    step: int = 0
    first_step: int = 0
    before: dict[str, Any] = field(default_factory=dict)
    train_time: float = 0.0  # seconds in optimizer steps (no evaluation, no saving)
    tokens_seen: int = 0
    losses: list[float] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)  # the random state right after the last step
    checkpoint: Path | None = None
    stopped: str | None = None  # None, "interrupted" or "non-finite"


@dataclass(frozen=True)
class _StepOutcome:
    loss: float  # mean over the global batch's answer tokens
    grad_norm: float
    tokens: int  # tokens in the global batch (all processes)


class _Run:
    """One training run: ``run()`` sets up, then the steps run (``_train_steps``)."""

    def __init__(
        self, config: TrainConfig, accelerator: Any, on_step: Callable | None, evaluate_before: bool
    ) -> None:
        self.config = config
        self.evaluate_before = evaluate_before
        self.acc = accelerator
        self.on_step = on_step
        self.out = Path(config.output_dir)
        self.main = accelerator.is_main_process
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.sharded = config.fsdp and self.world > 1  # FSDP2 (training/sharding.py) instead of DDP
        self.start = time.perf_counter()
        self._permutation: dict[int, list[int]] = {}  # the current epoch's row order

    def say(self, text: str = "") -> None:
        if self.main:
            print(text, flush=True)

    # ------------------------------------------------------------------ set-up (nothing written yet)
    def run(self) -> TrainResult:
        """Check, load, wrap, set up the optimizer, then train (:meth:`_train_steps`)."""
        config = self.config
        self._set_threads()
        self._check_output_dir()
        self.acc.wait_for_everyone()  # every process checks before any writes
        method_config = build_method_config(config.method, config.method_options, config.task)
        check_optimizer(config, method_config)
        if self.sharded:
            check_shardable(config.quantize, is_model_level(method_config), config.save_every, config.resume)
        self.say(f"peftkit train: {config.method} on {config.model} ({config.task}, {config.dtype})")
        check_data(config)  # bad data is reported before the model loads
        model, data = self._load(method_config)
        if self.sharded:
            shard(model)
        steps_per_epoch = self._steps_per_epoch(len(data.train))
        total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
        references = data.validation["references"] if data.validation is not None else []
        metric = headline_metric(config.metric, config.task, references)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config, total_steps)
        self._make_output_dir()
        if self.sharded:  # the model is sharded in place; accelerate would wrap it in DDP
            wrapped, optimizer = model, self.acc.prepare(optimizer)
        else:
            wrapped, optimizer = self.acc.prepare(model, optimizer)
        self._report_setup(model, data, total_steps, steps_per_epoch, metric)
        setup = _Setup(
            model=model,
            wrapped=wrapped,
            optimizer=optimizer,
            scheduler=scheduler,
            params=params,
            data=data,
            train_rows=data.train.select_columns(["input_ids", "labels"]).to_list(),
            targets=data.train["targets"],
            pad_id=pad_token_id(self.tokenizer),
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            metric=metric,
        )
        return self._train_steps(setup)

    def _load(self, method_config: Any) -> tuple[nn.Module, PreparedData]:
        """The base model with the method applied (seeded), and the tokenized data."""
        from accelerate.utils import set_seed

        config = self.config
        model, self.tokenizer = load_base_model(config)
        data = prepare_data(config, self.tokenizer)
        labels = getattr(model.config, "num_labels", None)
        if data.label_names is not None and len(data.label_names) != labels:
            raise UsageError(
                f"the data has {len(data.label_names)} labels {data.label_names} but {config.model} has a "
                f"{labels}-label classification head; use data with {labels} labels or a model with "
                f"{len(data.label_names)} (config.json num_labels)"
            )
        set_seed(config.seed)  # adapter initialisation
        return self._apply_method(model, method_config), data

    def _steps_per_epoch(self, rows: int) -> int:
        config = self.config
        global_batch = config.batch_size * config.grad_accum * self.world
        if rows < global_batch:
            raise UsageError(
                f"{rows} training rows are fewer than one global batch ({global_batch} = "
                f"batch_size {config.batch_size} x grad_accum {config.grad_accum} x {self.world} processes); "
                "lower batch_size"
            )
        return rows // global_batch

    def _set_threads(self, running: int = 0) -> None:
        """Fix the CPU thread count: ``threads``, else ``OMP_NUM_THREADS``, else :func:`auto_threads`."""
        if self.acc.device.type != "cpu":
            return
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        elif "OMP_NUM_THREADS" not in os.environ:
            wanted = auto_threads(running * self.world, self.world)
            if wanted != torch.get_num_threads():
                torch.set_num_threads(wanted)
                if running:
                    self.say(f"CPU threads: {wanted} (other programs' load changed)")

    def _check_output_dir(self) -> None:
        check_output_dir(self.config)

    def _apply_method(self, model: nn.Module, method_config: Any) -> nn.Module:

        if method_config is None:  # full fine-tuning
            model.requires_grad_(True)
        else:
            try:
                model = wrap(model, method_config)
            except ValueError as e:
                raise UsageError(f"method {self.config.method!r}: {e}") from e
        if self.config.gradient_checkpointing:
            if isinstance(model, PeftModel):
                model.gradient_checkpointing_enable()
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _make_output_dir(self) -> None:
        if self.main:
            prepare_output_dir(self.config)
        self.acc.wait_for_everyone()

    def _report_setup(
        self, model: nn.Module, data: PreparedData, total: int, per_epoch: int, metric: str
    ) -> None:
        stats = data.stats
        lines = [f"data: {stats['examples']} training examples"]
        if stats.get("truncated"):
            lines.append(
                f"  {stats['truncated']} truncated to max_length={self.config.max_length}"
                + (
                    f", {stats['dropped']} of them dropped (no answer token left)"
                    if stats.get("dropped")
                    else ""
                )
            )
        if "packed_rows" in stats:
            lines.append(
                f"  packed into {stats['packed_rows']} rows of up to {self.config.max_length} tokens"
            )
        validation = len(data.validation) if data.validation is not None else 0
        generated = min(self.config.eval_examples, validation) if self.config.task != "seq-cls" else 0
        scored = f" (loss on all, the first {generated} also by generation)" if generated else ""
        lines.append(f"  {validation} held-out rows{scored}; headline metric: {metric}")
        batch = self.config.batch_size * self.config.grad_accum * self.world
        lines.append(
            f"steps: {total} of {batch} rows ({total / per_epoch:.2f} epochs), {self.world} process(es)"
            + (f", {torch.get_num_threads()} CPU thread(s) each" if self.acc.device.type == "cpu" else "")
            + (", parameters sharded (FSDP2)" if self.sharded else "")
        )
        if self.config.fsdp and not self.sharded:
            lines.append("fsdp: one process, nothing to shard (start with torchrun --nproc_per_node N)")
        self.say("\n".join(lines))
        self.say(trainable_table(model))

    # ------------------------------------------------------------------ the loop
    def _train_steps(self, setup: _Setup) -> TrainResult:
        """Start (or resume), take optimizer steps until done or stopped, then save, evaluate, report."""
        state = self._start(setup)
        log = MetricsLog(self.out) if self.main else None
        if not self.config.resume and self.evaluate_before:
            state.before = self._evaluate(setup.model, setup.data, 0, log, "before training")
        bar = self._progress_bar(setup.total_steps, state.step)
        setup.wrapped.train()
        with _StopFlag() as stop:
            while state.step < setup.total_steps and state.stopped is None:
                tick = time.perf_counter()
                outcome = self._step(setup, state.step)
                if outcome is None:
                    state.stopped = "non-finite"
                    break
                self._after_step(setup, state, outcome, time.perf_counter() - tick, log, bar, stop)
        bar.close()
        return self._finish(setup, state, log)

    def _start(self, setup: _Setup) -> _LoopState:
        """A fresh state, or the one of the latest checkpoint with ``resume`` (its RNG state restored)."""
        state = _LoopState()
        if self.config.resume:
            checkpoint = latest_checkpoint(self.out)
            saved, rng = load_checkpoint(checkpoint, setup.model, setup.optimizer, setup.scheduler, self.rank)
            state = _LoopState(
                step=saved["step"],
                first_step=saved["step"],
                before=saved["before"],
                train_time=saved["train_time"],
                tokens_seen=saved["tokens_seen"],
                checkpoint=checkpoint,
            )
            if self.main:
                truncate_metrics(self.out / METRICS_FILE, state.step)
            self.say(f"resuming from {checkpoint} (step {state.step})")
            restore_rng(rng)
        state.rng = rng_state()
        return state

    def _step(self, setup: _Setup, step: int) -> _StepOutcome | None:
        """One optimizer step over this process's micro-batches of global batch ``step``; None (and no
        update) when the loss or the gradient norm is not finite."""
        config, acc = self.config, self.acc
        indices = self._global_batch(step, setup.steps_per_epoch, len(setup.train_rows))
        n_targets = sum(setup.targets[i] for i in indices)
        local_loss = torch.zeros((), device=acc.device)
        local_tokens = torch.zeros((), device=acc.device)
        for j, rows in enumerate(self._micro_batches(indices)):
            batch = collate([setup.train_rows[i] for i in rows], setup.pad_id)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = j == config.grad_accum - 1
            with self._gradient_sync(setup, sync), self._loss_mode():
                summed, _ = loss_sum(setup.wrapped, batch, config.task)
                acc.backward(summed * self.world / n_targets)  # DDP and FSDP2 average over processes
            local_loss += summed.detach()
            local_tokens += batch["attention_mask"].sum()
        norm = to_float(acc.clip_grad_norm_(setup.params, config.max_grad_norm or float("inf")))
        loss = (acc.reduce(local_loss, "sum") / n_targets).item()
        tokens = int(acc.reduce(local_tokens, "sum").item())
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self._report_non_finite(step + 1, loss, norm)
            return None
        setup.optimizer.step()
        setup.scheduler.step()
        setup.optimizer.zero_grad(set_to_none=True)
        return _StepOutcome(loss, norm, tokens)

    def _loss_mode(self) -> Any:
        """Under FSDP2 the model's own loss: the fused head loss reads the head's weight outside the
        model's forward, where it is sharded."""
        return fused_cross_entropy(False) if self.sharded else contextlib.nullcontext()

    def _gradient_sync(self, setup: _Setup, sync: bool) -> Any:
        """Gradients reduced across processes after this micro-batch (``sync``) or kept local."""
        if self.sharded:
            return gradient_sync(setup.model, sync)
        return contextlib.nullcontext() if sync else self.acc.no_sync(setup.wrapped)

    def _after_step(
        self,
        setup: _Setup,
        state: _LoopState,
        outcome: _StepOutcome,
        seconds: float,
        log: MetricsLog | None,
        bar: Any,
        stop: _StopFlag,
    ) -> None:
        """Bookkeeping after a step: progress, metrics, ``on_step``, Ctrl-C, checkpoints, threads, eval."""
        config = self.config
        state.step += 1
        state.rng = rng_state()
        state.train_time += seconds
        state.tokens_seen += outcome.tokens
        state.losses.append(outcome.loss)
        step = state.step
        bar.update(1)
        bar.set_postfix(
            loss=f"{outcome.loss:.4f}", tok_s=f"{state.tokens_seen / max(state.train_time, 1e-9):.0f}"
        )
        if log is not None and (step % config.log_every == 0 or step == setup.total_steps):
            log.write(
                {
                    "step": step,
                    "split": "train",
                    "loss": outcome.loss,
                    "lr": setup.scheduler.get_last_lr()[0],
                    "grad_norm": outcome.grad_norm,
                    "tokens_per_s": outcome.tokens / max(seconds, 1e-9),
                }
            )
        if self.on_step is not None and self.main:
            self.on_step(step, outcome.loss, setup.model)
        if self._should_stop(stop.requested):  # read after on_step, which may have pressed Ctrl-C
            # under FSDP2 a checkpoint would hold rank 0's shards only: none is written (sharding.py)
            state.checkpoint = None if self.sharded else self._save(setup, state)
            state.stopped = "interrupted"
            return
        if config.save_every and (step % config.save_every == 0 or step == setup.total_steps):
            state.checkpoint = self._save(setup, state)
        if step % THREAD_CHECK_EVERY == 0 and not config.threads:
            self._set_threads(running=torch.get_num_threads())
        if config.eval_every and step % config.eval_every == 0 and step < setup.total_steps:
            self._evaluate(setup.model, setup.data, step, log, f"step {step}", bar)

    def _finish(self, setup: _Setup, state: _LoopState, log: MetricsLog | None) -> TrainResult:
        """Save and score a finished run, close the metrics, and build the result."""
        after: dict[str, Any] = {}
        if state.stopped is None:
            self._save_final(setup.model)
            after = self._evaluate(setup.model, setup.data, state.step, log, "after training")
        if log is not None:
            log.close()
            plot_losses(read_metrics(self.out / METRICS_FILE), self.out / PLOT_FILE, title=self._title())
        trainable, total = count_parameters(setup.model)
        result = TrainResult(
            output_dir=self.out,
            steps=state.step,
            first_step=state.first_step,
            losses=state.losses,
            metric=setup.metric,
            before=state.before,
            after=after,
            trainable=trainable,
            total=total,
            tokens_per_s=state.tokens_seen / max(state.train_time, 1e-9),
            wall_time_s=time.perf_counter() - self.start,
            peak_memory_bytes=peak_memory(),
            stopped=state.stopped,
            checkpoint=state.checkpoint,
            model=setup.model,
            tokenizer=self.tokenizer,
            train_time_s=state.train_time,
            data=setup.data,
        )
        if state.stopped == "interrupted" and state.checkpoint is None:
            self.say(f"interrupted at step {state.step}; no checkpoint (FSDP2 runs write none yet)")
        elif state.stopped == "interrupted":
            self.say(
                f"interrupted at step {state.step}; checkpoint saved to {state.checkpoint}. Continue with "
                "the same command plus --resume"
            )
        elif state.stopped is None:
            self._summary(result, state.train_time)
        return result

    def _progress_bar(self, total: int, initial: int) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc="training",
            unit="step",
            disable=not self.main,
            dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )

    def _global_batch(self, step: int, per_epoch: int, rows: int) -> list[int]:
        """Row indices of step ``step``'s global batch: a slice of the epoch's seeded permutation."""
        epoch, position = divmod(step, per_epoch)
        if epoch not in self._permutation:
            generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
            self._permutation = {epoch: torch.randperm(rows, generator=generator).tolist()}
        size = self.config.batch_size * self.config.grad_accum * self.world
        return self._permutation[epoch][position * size : (position + 1) * size]

    def _micro_batches(self, indices: list[int]) -> list[list[int]]:
        """This process's micro-batches of a global batch: micro-batch j of rank r is slice j*world + r."""
        b = self.config.batch_size
        return [
            indices[(j * self.world + self.rank) * b : (j * self.world + self.rank + 1) * b]
            for j in range(self.config.grad_accum)
        ]

    def _should_stop(self, requested: bool) -> bool:
        """Whether any process saw Ctrl-C (all processes must stop at the same step)."""
        if self.world == 1:
            return requested
        flag = torch.tensor([1.0 if requested else 0.0], device=self.acc.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _report_non_finite(self, step: int, loss: float, norm: float) -> None:
        last = latest_checkpoint(self.out)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (set save_every)"
        print(
            f"peftkit train: stopped: the loss is {loss} (gradient norm {norm}) at step {step}; the update "
            f"was not applied and {kept}. Lower --lr, keep --max-grad-norm on, or try --dtype float32.",
            file=sys.stderr,
        )

    # ------------------------------------------------------------------ saving, evaluation, reports
    def _save(self, setup: _Setup, state: _LoopState) -> Path:
        model = setup.model
        return save_checkpoint(
            self.out,
            state.step,
            model=model,
            optimizer=setup.optimizer,
            scheduler=setup.scheduler,
            rng=state.rng,
            state={"before": state.before, "train_time": state.train_time, "tokens_seen": state.tokens_seen},
            keep=self.config.keep_checkpoints,
            barrier=self.acc.wait_for_everyone,
            rank=self.rank,
            save_model=model.save_pretrained if isinstance(model, PeftModel) else None,
        )

    def _save_final(self, model: nn.Module) -> None:
        if hasattr(model, "peft_config"):
            with full_parameters(model) if self.sharded else contextlib.nullcontext():
                if self.main:
                    model.save_pretrained(self.out)
                self.acc.wait_for_everyone()
            return
        # full fine-tuning: a complete model directory, files with the umask's mode
        saveable = with_full_state_dict(model) if self.sharded else model
        if self.main:
            save_pretrained([saveable, self.tokenizer], self.out)
        self.acc.wait_for_everyone()

    def _evaluate(
        self, model, data: PreparedData, step: int, log: MetricsLog | None, when: str, progress: Any = None
    ) -> dict[str, Any]:
        """Score on the held-out rows (main process; the others wait; under FSDP2 every process runs
        the same evaluation, as its forward needs them all), leaving the random state as it was."""
        result: dict[str, Any] = {}
        if (self.main or self.sharded) and data.validation is not None and len(data.validation) > 0:
            with torch.random.fork_rng(devices=[]):
                result = evaluate(
                    model,
                    self.tokenizer,
                    data.validation,
                    self.config.task,
                    examples=self.config.eval_examples,
                    max_new_tokens=self.config.max_new_tokens,
                    batch_size=2 * self.config.batch_size,  # no gradients: twice the rows fit
                )
            if self.main:
                self._report_eval(result, step, log, when, progress)
        self.acc.wait_for_everyone()
        return result

    def _report_eval(
        self, result: dict[str, Any], step: int, log: MetricsLog | None, when: str, progress: Any
    ) -> None:
        shown = {k: v for k, v in result.items() if isinstance(v, float)}
        text = f"eval ({when}): " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
        if result.get("samples"):
            sample = result["samples"][0]
            text += f"\n  e.g. answer {sample['answer']!r}, reference {sample['reference']!r}"
        (progress.write if progress is not None else print)(text)
        if log is not None:
            log.write({"step": step, "split": "eval", **shown})

    def _title(self) -> str:
        return f"{self.config.method} on {Path(self.config.model).name}, data {Path(self.config.data).name}"

    def _summary(self, result: TrainResult, train_time: float) -> None:
        if not self.main:
            return
        text, summary = summarize(result, train_time)
        write_summary(self.out, summary)
        self.say(text)
        self.say(_try_it(self.config, self.out))


def _try_it(config: TrainConfig, out: Path) -> str:
    """The commands to try a finished run with: only those that work for its method."""
    from peftkit.training.tasks import builtin_task

    task = builtin_task(config.data)
    example = task.example if task else "<your prompt>"
    lines = ["", "Try it:", f"  peftkit generate {out} {json.dumps(example)}", f"  peftkit eval {out}"]
    entry = method_entry(config.method)
    if entry is None:
        lines.append(f"  # {out} is a whole transformers model: from_pretrained({str(out)!r}) loads it alone")
    elif entry.config_class.mergeable:
        merged = out.with_name(out.name + "-merged")
        lines.append(f"  peftkit merge {out} {merged}    # a plain transformers model, no peftkit needed")
    else:
        lines.append(
            f"  # {config.method} cannot be merged into the weights; in Python: "
            f"peftkit.load(base, {str(out)!r})"
        )
    lines.append(f"Files: {out}/{METRICS_FILE}, {out}/{PLOT_FILE}, {out}/{CONFIG_FILE}")
    return "\n".join(lines)
