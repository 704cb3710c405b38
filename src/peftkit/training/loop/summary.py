"""The end of a run: the metrics closed and plotted, the :class:`TrainResult`, the summary and what to
try next; and the progress bar the steps update."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from peftkit.model import count_parameters
from peftkit.training.loop.context import RunContext
from peftkit.training.loop.setup import RunSetup
from peftkit.training.loop.state import LoopState, wall_time
from peftkit.training.method_choice import method_entry
from peftkit.training.reports import (
    METRICS_FILE,
    PLOT_FILE,
    MetricsLog,
    peak_memory,
    plot_losses,
    read_metrics,
    summarize,
)
from peftkit.training.result import TrainResult
from peftkit.training.run_directory import CONFIG_FILE, write_summary
from peftkit.training.train_config import TrainConfig

__all__ = ["finish", "progress_bar"]


def progress_bar(context: RunContext, total: int, initial: int) -> Any:
    """A tqdm bar over the run's steps (main process only; rare updates when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="training",
        unit="step",
        disable=not context.main,
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )


def finish(
    context: RunContext, setup: RunSetup, state: LoopState, after: dict[str, Any], log: MetricsLog | None
) -> TrainResult:
    """Close and plot the metrics, build the result, and say how the run ended: the summary (written to
    ``summary.json``) and the commands to try it, or how to resume an interrupted run.

    Args:
        after: the scores after training (empty when the run stopped early).
    """
    if log is not None:
        log.close()
        plot_losses(
            read_metrics(context.out / METRICS_FILE), context.out / PLOT_FILE, title=_title(context.config)
        )
    trainable, total = count_parameters(setup.model)
    result = TrainResult(
        output_dir=context.out,
        steps=state.step,
        first_step=state.first_step,
        losses=state.losses,
        metric=setup.metric,
        before=state.before,
        after=after,
        trainable=trainable,
        total=total,
        tokens_per_s=state.tokens_seen / max(state.train_time, 1e-9),
        tokens=state.tokens_seen,
        padding_tokens=state.padding_seen,
        wall_time_s=wall_time(context, state),
        sessions=state.sessions,
        peak_memory_bytes=peak_memory(),
        stopped=state.stopped,
        checkpoint=state.checkpoint,
        model=setup.model,
        tokenizer=setup.tokenizer,
        train_time_s=state.train_time,
        data=setup.data,
    )
    if state.stopped == "interrupted" and state.checkpoint is None:
        context.say(f"interrupted at step {state.step}; no checkpoint (FSDP2 runs write none yet)")
    elif state.stopped == "interrupted":
        context.say(
            f"interrupted at step {state.step}; checkpoint saved to {state.checkpoint}. Continue with "
            "the same command plus --resume"
        )
    elif state.stopped is None and context.main:
        text, summary = summarize(result, state.train_time)
        write_summary(context.out, summary)
        context.say(text)
        context.say(_try_it(context.config, context.out))
    return result


def _title(config: TrainConfig) -> str:
    return f"{config.method} on {Path(config.model).name}, data {Path(config.data).name}"


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
