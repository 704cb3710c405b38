"""Running a :class:`~peftkit.compare.plan.ComparePlan`: the base model once, then each method.

Layout of the report directory::

    base.json                  the base model's scores (before any training), reused by reruns
    runs/<name>/               each method's ``peftkit train`` output (adapter, metrics, loss.png)
    runs/<name>/compare.json   the method's row, written when it has finished
    report.md, report.json, methods.png, rank_sweep.png

A rerun skips every method whose ``compare.json`` has the same settings fingerprint and retrains the
others from the start (a half-finished method is started over). Every file is written atomically.

Per method, besides what ``peftkit train`` reports, the row holds the measured memory of one training
step on the first training batch (parameters, gradients, optimizer state and autograd's saved tensors:
:func:`peftkit.memory.measure_training_step`), the estimate for the same batch shape where
:func:`peftkit.memory.estimate` models the method (full fine-tuning and plain LoRA), the size of the
files it saved, and the loss on the general text after training (forgetting).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.compare.plan import ComparePlan, PlannedRun, fingerprint
from peftkit.foundation.io import atomic_write
from peftkit.model import count_parameters

if TYPE_CHECKING:
    from peftkit.training.data import PreparedData
    from peftkit.training.train_config import TrainConfig

__all__ = [
    "BASE_FILE",
    "ROW_FILE",
    "base_scores",
    "estimated_peak",
    "read_rows",
    "run_compare",
    "run_method",
    "threads_of_runs",
]

BASE_FILE = "base.json"
ROW_FILE = "compare.json"
FORGETTING_ROW_TOKENS = 256  # the general text is scored in rows of this many tokens


def run_compare(plan: ComparePlan, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method of ``plan`` not already done and write the report; returns ``report.json``'s data.

    A method whose loss turned non-finite is a result (its row says so); one interrupted with Ctrl-C
    is not: nothing is recorded for it and ``KeyboardInterrupt`` is raised after the report is written.

    Raises:
        UsageError: bad input found while setting up a method (data, model, method options).
        KeyboardInterrupt: a method was interrupted.
    """
    from peftkit.compare.report import write_report

    plan.output_dir.mkdir(parents=True, exist_ok=True)
    base = base_scores(plan, say)
    for i, run in enumerate(plan.runs, start=1):
        done = _finished_row(run)
        if done is not None:
            say(f"[{i}/{len(plan.runs)}] {run.name}: done before, skipped ({run.config.output_dir})")
            continue
        say(f"\n[{i}/{len(plan.runs)}] {run.name}")
        row = run_method(run, base, plan)
        if row["stopped"] == "interrupted":  # not a result: the method starts over on the next run
            write_report(plan, base, read_rows(plan))
            say(f"{run.name} was interrupted; rerun the same command to continue from this method")
            raise KeyboardInterrupt
        _write_json(Path(run.config.output_dir) / ROW_FILE, row)
        write_report(plan, base, read_rows(plan))  # a partial report after every method
    return write_report(plan, base, read_rows(plan))


@contextmanager
def threads_of_runs(config: TrainConfig) -> Iterator[int]:
    """Use, for the block, the CPU threads ``peftkit train`` would use for ``config`` (``threads``, else
    ``OMP_NUM_THREADS``'s, else the cores other programs leave free: on a busy machine two threads
    fighting other processes ran a 1024² matmul at 0.6-0.8x one thread's speed, measured)."""
    from peftkit.foundation.cpu_load import chosen_threads

    before = torch.get_num_threads()
    wanted = chosen_threads(config.threads) or before
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(before)


def base_scores(plan: ComparePlan, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The base model's held-out scores, general-text loss and size (computed once, kept in base.json)."""
    from peftkit.training.data import prepare_data, with_labels
    from peftkit.training.run_directory import load_base_model

    shared = with_labels(plan.shared)  # a classifier: a head for the data's labels, as its runs get
    key = _base_fingerprint(plan)
    path = plan.output_dir / BASE_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == key:
            return saved
    say(f"base model: scoring {shared.model} before any training")
    model, tokenizer = load_base_model(shared)
    data = prepare_data(shared, tokenizer)
    if data.validation is None or len(data.validation) == 0:
        from peftkit.foundation.errors import UsageError

        raise UsageError("compare needs held-out rows: set validation_data or validation_split > 0")
    with threads_of_runs(shared):
        scores, metric = _held_out_scores(model, tokenizer, data, shared)
    base = {
        "fingerprint": key,
        "model": shared.model,
        "objective": shared.objective,
        "metric": metric,
        "scores": _numbers(scores),
        "samples": scores.get("samples", []),
        "general_loss": _general_loss(model, tokenizer, plan) if shared.task == "causal-lm" else None,
        "total_parameters": count_parameters(model)[1],
        "checkpoint_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "training_rows": len(data.train),
        "validation_rows": len(data.validation),
    }
    _write_json(path, base)
    say(f"base model: {base['metric']} {base['scores'].get(base['metric'], float('nan')):.4g}")
    return base


def run_method(run: PlannedRun, base: dict[str, Any], plan: ComparePlan) -> dict[str, Any]:
    """Train one method and measure it; returns its report row."""
    from peftkit.training.loop import train

    result = train(run.config.replace(overwrite=True, resume=False), evaluate_before=False)
    row: dict[str, Any] = {
        "name": run.name,
        "fingerprint": run.fingerprint,
        "objective": run.config.objective,
        "method": run.config.method,
        "method_options": run.config.method_options,
        "lr": run.config.lr,
        "rank": run.rank,
        "steps": result.steps,
        "stopped": result.stopped,
        "trainable_parameters": result.trainable,
        "total_parameters": result.total,
        "trainable_percent": 100 * result.trainable / max(result.total, 1),
        "seconds_per_step": result.train_time_s / max(result.steps, 1),
        "tokens_per_s": result.tokens_per_s,
        "wall_time_s": result.wall_time_s,
        "final_train_loss": result.losses[-1] if result.losses else None,
        "saved_bytes": _saved_bytes(Path(run.config.output_dir)),
    }
    if result.stopped is not None:
        return row
    model, tokenizer = result.model, result.tokenizer
    row["scores"] = _numbers(result.after)
    row["samples"] = result.after.get("samples", [])
    row["general_loss"] = _general_loss(model, tokenizer, plan) if run.config.task == "causal-lm" else None
    if row["general_loss"] is not None and base.get("general_loss") is not None:
        row["forgetting"] = row["general_loss"] - base["general_loss"]
    if run.config.objective == "sft":
        batch = _first_batch(result.data, run.config.batch_size, tokenizer)
        row["measured_memory"] = _measure(model, batch)
        row["estimated_peak_bytes"] = estimated_peak(run, tuple(batch["input_ids"].shape))
        return row
    batch, longest = _first_pairs(result.data, run.config.batch_size, tokenizer, model)
    row["measured_memory"] = _measure(model, batch, _pair_loss(run.config))
    row["estimated_peak_bytes"] = estimated_peak(run, (len(batch["answer_lengths"]) // 2, longest))
    return row


def read_rows(plan: ComparePlan) -> list[dict[str, Any]]:
    """The finished methods' rows, in plan order (methods not run yet are left out)."""
    rows = []
    for run in plan.runs:
        row = _finished_row(run)
        if row is not None:
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ helpers
def _finished_row(run: PlannedRun) -> dict[str, Any] | None:
    path = Path(run.config.output_dir) / ROW_FILE
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return row if row.get("fingerprint") == run.fingerprint else None


def _base_fingerprint(plan: ComparePlan) -> str:
    """What decides the base model's scores: the shared settings less the optimisation ones."""
    neutral = {"method": "full", "method_options": {}, "max_steps": 0, "lr": 1.0, "warmup_steps": 0}
    neutral |= {"grad_accum": 1, "weight_decay": 0.0, "max_grad_norm": 0.0, "gradient_checkpointing": False}
    settings = dataclasses.replace(plan.shared, **neutral)
    return fingerprint(settings) + hashlib.sha256(plan.general_text.read_bytes()).hexdigest()[:8]


def _general_loss(model: nn.Module, tokenizer: Any, plan: ComparePlan) -> float:
    from peftkit.training.evaluation import text_loss

    with torch.random.fork_rng(devices=[]):
        return text_loss(model, tokenizer, plan.general_text.read_text(), FORGETTING_ROW_TOKENS)


def _first_batch(data: PreparedData, batch_size: int, tokenizer: Any) -> dict[str, torch.Tensor]:
    """The first ``batch_size`` training rows the run tokenized, collated: a micro-batch's shape."""
    from peftkit.training.data import collate
    from peftkit.training.evaluation import pad_token_id

    rows = data.train.select(range(min(batch_size, len(data.train))))
    rows = rows.select_columns(["input_ids", "labels"]).to_list()
    return collate(rows, pad_token_id(tokenizer))


def _held_out_scores(
    model: nn.Module, tokenizer: Any, data: PreparedData, shared: TrainConfig
) -> tuple[dict[str, Any], str]:
    """The base model's held-out scores and their headline metric: preference accuracy for a
    preference objective, the task's metric otherwise."""
    from peftkit.training.evaluation import evaluate, headline_metric

    if shared.objective != "sft":
        return _base_pair_scores(model, tokenizer, data, shared), "preference_accuracy"
    scores = evaluate(
        model,
        tokenizer,
        data.validation,
        shared.task,
        examples=shared.eval_examples,
        max_new_tokens=shared.max_new_tokens,
        batch_size=2 * shared.batch_size,
        progress=True,  # minutes on a CPU: a bar, not silence
    )
    return scores, headline_metric(shared.metric, shared.task, data.validation["references"])


def _base_pair_scores(model: nn.Module, tokenizer: Any, data: PreparedData, shared: Any) -> dict[str, Any]:
    """The base model on held-out pairs under the shared objective (DPO: it is its own reference)."""
    from peftkit.objectives.pair_batch import collate_pairs
    from peftkit.objectives.sequences import shares_prompts
    from peftkit.training.evaluation import pad_token_id
    from peftkit.training.loop.reference import reference_log_probs
    from peftkit.training.loop.setup import preference_settings
    from peftkit.training.pair_evaluation import evaluate_pairs

    settings = preference_settings(shared)
    collate = functools.partial(
        collate_pairs, pad_id=pad_token_id(tokenizer), shared_prompt=shares_prompts(model)
    )
    rows = data.validation
    if settings.uses_reference:
        pairs = rows.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
        reference = reference_log_probs(model, model, pairs, collate, 2 * shared.batch_size, False)
        rows = rows.add_column("reference_chosen", reference[:, 0].tolist())
        rows = rows.add_column("reference_rejected", reference[:, 1].tolist())
    return evaluate_pairs(
        model,
        tokenizer,
        rows,
        settings,
        collate,
        shared.eval_examples,
        shared.max_new_tokens,
        2 * shared.batch_size,
    )


def _first_pairs(
    data: PreparedData, batch_size: int, tokenizer: Any, model: nn.Module
) -> tuple[dict[str, torch.Tensor], int]:
    """The first ``batch_size`` training pairs collated as the run collated them (reference values 0:
    memory does not depend on them), and their longest sequence (prompt + longer answer)."""
    from peftkit.objectives.pair_batch import collate_pairs
    from peftkit.objectives.sequences import shares_prompts
    from peftkit.training.evaluation import pad_token_id

    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    rows = data.train.select(range(min(batch_size, len(data.train)))).select_columns(columns).to_list()
    rows = [{**row, "reference_chosen": 0.0, "reference_rejected": 0.0} for row in rows]
    longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
    return collate_pairs(rows, pad_token_id(tokenizer), shared_prompt=shares_prompts(model)), longest


def _pair_loss(config: Any) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The preference objective's mean loss over a batch of pairs, for measuring a step."""
    from peftkit.objectives.preference import preference_objective
    from peftkit.training.loop.setup import preference_settings

    objective = preference_objective(preference_settings(config))

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        total, pairs = objective(model, batch)
        return total / pairs

    return loss


def _measure(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """One training step's memory (learning rate 0: the weights do not change)."""
    from peftkit.memory import measure_training_step

    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            measured = measure_training_step(model, batch, loss_fn=loss)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {**measured.__dict__, "batch": list(batch["input_ids"].shape)}


def estimated_peak(run: PlannedRun, shape: tuple[int, int]) -> int | None:
    """:func:`peftkit.memory.estimate`'s peak for a ``(rows, seq)`` batch (pairs: ``(pairs, longest
    sequence)``); None where it has no model.

    The estimate models full fine-tuning and plain LoRA (not DoRA) of decoder-only models.
    """
    from peftkit.memory import estimate
    from peftkit.methods.lora import LoraConfig
    from peftkit.training.method_choice import build_method_config

    config = run.config
    method = build_method_config(config.method, config.method_options, config.task)
    is_lora = isinstance(method, LoraConfig) and not method.use_dora and config.method == "lora"
    if method is not None and not is_lora:
        return None
    rows, seq = shape
    try:
        result = estimate(
            config.model,
            method=method if method is not None else "lora",
            batch=int(rows),
            seq=int(seq),
            dtype=config.dtype,
            grad_checkpointing=config.gradient_checkpointing,
            objective=config.objective,
            loss="model" if config.objective == "sft" else "fused",
        )
    except ValueError:
        return None
    return (result.full if method is None else result.peft).peak


def _saved_bytes(directory: Path) -> int:
    """Bytes of the weights a run saved (adapter or full model), checkpoints excluded."""
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def _numbers(scores: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text))
