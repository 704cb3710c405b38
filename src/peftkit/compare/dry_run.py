"""Checking a plan before anything trains, and ``peftkit compare --dry-run``'s table.

Every method is applied to the model built on the ``meta`` device (shapes only: no weights are read),
which finds a method that selects nothing or a bad option in a second instead of an hour into a run,
and counts its trainable parameters.

The time column is rough by design: a step is taken as ``6·N·tokens`` floating-point operations for
full fine-tuning and ``4·N·tokens`` for methods that freeze the base (forward, and the backward to the
inputs only), run at :data:`TRAINING_EFFICIENCY` of the speed this machine reaches on a large float32
matrix product (measured in a fraction of a second; on a busy machine it measures the share left);
scoring reads the prompts at that speed and decodes each new token at :data:`GENERATION_EFFICIENCY`
of it (decoding moves all the weights for a few rows at a time).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.compare.plan import ComparePlan, PlannedRun, describe
from peftkit.foundation.errors import UsageError
from peftkit.foundation.formatting import format_count, format_duration, format_percent
from peftkit.training.evaluation import ANSWER_MARGIN

__all__ = ["PlannedCost", "check_plan", "dry_run_table", "machine_flops"]

# Shares of the matmul speed (measured with the runs' own thread count) reached by SmolLM2-135M on
# person-json, 2-core CPU under load 6-10, one thread (benchmarks/compare_time.py; docs/benchmarks.md):
# a training step 0.76 and 1.29 in two runs, the held-out loss pass 0.67 and 1.54, greedy decoding of
# 32 rows at once 0.44 and 0.69; the low end is kept. (The first calibration, 0.4 and 0.1, measured the
# matmul with every core's thread fighting other programs, about half the speed the runs got.)
TRAINING_EFFICIENCY = 0.7
GENERATION_EFFICIENCY = 0.4
MATMUL_SIZE = 1024


@dataclass(frozen=True)
class PlannedCost:
    """What a run is expected to cost: parameters, memory (where estimated) and time."""

    name: str
    trainable: int
    total: int
    estimated_peak: int | None
    seconds: float | None
    base_seconds: float | None = None  # scoring the base model (once per comparison)


def check_plan(plan: ComparePlan) -> dict[str, tuple[int, int]]:
    """Apply every method to a meta-device copy of the model; ``{name: (trainable, total)}``.

    The counts are those ``peftkit train`` reports: the total includes the adapter's parameters.

    Raises:
        UsageError: a method that cannot be applied (selects nothing, a bad option…), naming it.
    """
    configs: dict[str, Any] = {}  # each model's config is read once
    counts = {}
    for run in plan.runs:
        if run.config.model not in configs:
            configs[run.config.model] = _model_config(run.config.model)
        counts[run.name] = _count(run, configs[run.config.model])
    return counts


def _count(run: PlannedRun, model_config: Any) -> tuple[int, int]:
    import transformers

    from peftkit.foundation.tasks import TASKS
    from peftkit.model import count_parameters, wrap
    from peftkit.training.method_choice import build_method_config

    config = run.config
    method = build_method_config(config.method, config.method_options, config.task)
    with torch.device("meta"):
        model = getattr(transformers, TASKS[config.task].auto_class).from_config(model_config)
    if method is None:
        return count_parameters(model)
    try:
        return wrap(model, method).trainable_parameters()
    except (ValueError, TypeError) as e:
        raise UsageError(f"method {run.name!r} ({describe(run)}): {e}") from e


def _model_config(name: str) -> Any:
    from peftkit.memory import load_model_config

    try:
        return load_model_config(name)
    except ValueError as e:
        raise UsageError(str(e)) from e


def machine_flops(seconds: float = 0.3) -> float:
    """Floating-point operations per second of a float32 ``MATMUL_SIZE``² matrix product here."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * MATMUL_SIZE**3 * count / (time.perf_counter() - start)


def planned_costs(
    plan: ComparePlan, counts: dict[str, tuple[int, int]], tokenizer: Any = None
) -> list[PlannedCost]:
    """Expected memory and time per run (time needs ``tokenizer`` to measure the data's lengths)."""
    from peftkit.compare.runner import estimated_peak, threads_of_runs

    lengths = _lengths(plan, tokenizer) if tokenizer is not None else None
    with threads_of_runs(plan.shared):  # the speed the runs will see, not that of all cores fighting
        flops = machine_flops() if lengths is not None else None
    costs = []
    for run in plan.runs:
        trainable, total = counts[run.name]
        seq = int(lengths["train_max"]) if lengths else run.config.max_length
        shape = (run.config.batch_size, seq)
        seconds = base_seconds = None
        if lengths is not None and flops:
            seconds = _seconds(run, total, lengths, flops)
            base_seconds = _scoring_seconds(run, total, lengths, flops)
        costs.append(
            PlannedCost(run.name, trainable, total, estimated_peak(run, shape), seconds, base_seconds)
        )
    return costs


def _lengths(plan: ComparePlan, tokenizer: Any) -> dict[str, float]:
    from peftkit.training.data import prepare_data

    data = prepare_data(plan.shared, tokenizer)
    train = [len(ids) for ids in data.train["input_ids"]]
    validation = data.validation if data.validation is not None else None
    prompts = [len(ids) for ids in validation["prompt_ids"]] if validation is not None else [0]
    answers = [len(ids) for ids in validation["input_ids"]] if validation is not None else [0]
    general = (
        len(tokenizer(plan.general_text.read_text())["input_ids"]) if plan.shared.task == "causal-lm" else 0
    )
    scored = validation.select(range(min(plan.shared.eval_examples, len(validation)))) if validation else None
    references = [
        len(tokenizer(reference[0], add_special_tokens=False)["input_ids"])
        for reference in (scored["references"] if scored is not None else [])
    ]
    return {
        "general_tokens": general,
        "reference_max": max(references, default=0),
        "train_rows": len(train),
        "train_mean": sum(train) / len(train),
        "train_max": max(train),
        "validation_mean": sum(answers) / len(answers),
        "validation_rows": len(answers),
        "prompt_mean": sum(prompts) / len(prompts),
    }


def _seconds(run: PlannedRun, total: int, lengths: dict[str, float], flops: float) -> float:
    """Training (and the one step more that measures its memory) plus scoring after it."""
    config = run.config
    rows = config.batch_size * config.grad_accum
    steps = 1 + (config.max_steps or math.ceil(config.epochs * (lengths["train_rows"] // rows)))
    tokens = rows * lengths["train_mean"]
    per_token = 6 if config.method == "full" else 4
    training = steps * per_token * total * tokens / (flops * TRAINING_EFFICIENCY)
    return training + _scoring_seconds(run, total, lengths, flops)


def _scoring_seconds(run: PlannedRun, total: int, lengths: dict[str, float], flops: float) -> float:
    """The held-out loss pass, reading the prompts, decoding the answers, and the general text's loss."""
    config = run.config
    reading = (
        2 * total * (lengths["validation_rows"] * lengths["validation_mean"] + lengths["general_tokens"])
    )
    scored = min(config.eval_examples, int(lengths["validation_rows"]))
    reading += 2 * total * scored * lengths["prompt_mean"]
    # as evaluate() decodes: max_new_tokens, or 0 → the longest reference + its margin
    new_tokens = config.max_new_tokens or lengths["reference_max"] + ANSWER_MARGIN
    decoding = 2 * total * scored * new_tokens
    return reading / (flops * TRAINING_EFFICIENCY) + decoding / (flops * GENERATION_EFFICIENCY)


def dry_run_table(plan: ComparePlan, costs: list[PlannedCost]) -> str:
    """The plan as a table: method, what it trains, expected memory and time."""
    from peftkit.foundation.formatting import format_table

    rows = []
    for run, cost in zip(plan.runs, costs, strict=True):
        rows.append(
            [
                run.name,
                describe(run),
                f"{format_count(cost.trainable)} "
                f"({format_percent(100 * cost.trainable / max(cost.total, 1))})",
                "–" if cost.estimated_peak is None else f"{cost.estimated_peak / 1024**2:,.0f} MiB",
                "–" if cost.seconds is None else format_duration(cost.seconds),
            ]
        )
    known = [c.seconds for c in costs if c.seconds is not None]
    total = sum(known) + sum(c.base_seconds for c in costs[:1] if c.base_seconds is not None)
    lines = [
        format_table(rows, ["method", "settings", "trainable", "est. peak (longest rows)", "est. time"]),
        f"{len(plan.runs)} runs"
        + (
            f", about {format_duration(total)} in all with scoring the base model (rough: FLOPs at this "
            "machine's matmul speed)"
            if known
            else ""
        )
        + f"; report in {plan.output_dir}",
    ]
    return "\n".join(lines)
