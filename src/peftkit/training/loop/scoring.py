"""Scoring a run on its held-out rows (before, during and after training) and reporting the scores."""

from __future__ import annotations

from typing import Any

import torch

from peftkit.training.evaluation import evaluate
from peftkit.training.loop.context import RunContext
from peftkit.training.loop.setup import RunSetup
from peftkit.training.reports import MetricsLog

__all__ = ["evaluate_run"]


def evaluate_run(
    context: RunContext, setup: RunSetup, step: int, log: MetricsLog | None, when: str, progress: Any = None
) -> dict[str, Any]:
    """Score ``setup.model`` on the held-out rows, print and log the scores, and return them.

    The main process scores (the others wait), except under FSDP2, where every process runs the same
    evaluation since its forward needs them all. The random state is left as it was.

    Args:
        step: the step the scores belong to (0: before training).
        when: how the report names the moment ("before training", "step 40").
        progress: the run's progress bar, written above rather than broken.

    Returns:
        The scores (:func:`peftkit.training.evaluation.evaluate`), empty on other processes and without
        held-out rows.
    """
    config, data = context.config, setup.data
    result: dict[str, Any] = {}
    if (context.main or context.sharded) and data.validation is not None and len(data.validation) > 0:
        with torch.random.fork_rng(devices=[]):
            result = evaluate(
                setup.model,
                setup.tokenizer,
                data.validation,
                config.task,
                examples=config.eval_examples,
                max_new_tokens=config.max_new_tokens,
                batch_size=2 * config.batch_size,  # no gradients: twice the rows fit
            )
        if context.main:
            _report(result, step, log, when, progress)
    context.wait_for_everyone()
    return result


def _report(result: dict[str, Any], step: int, log: MetricsLog | None, when: str, progress: Any) -> None:
    shown = {k: v for k, v in result.items() if isinstance(v, float)}
    text = f"eval ({when}): " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
    if result.get("samples"):
        sample = result["samples"][0]
        text += f"\n  e.g. answer {sample['answer']!r}, reference {sample['reference']!r}"
    (progress.write if progress is not None else print)(text)
    if log is not None:
        log.write({"step": step, "split": "eval", **shown})
