"""Setting a run up: check everything, load and wrap the model, tokenize the data, build the optimizer.

Nothing is written until every check has passed (settings, output directory, method and optimizer,
data files, model, batch size); then the output directory is created with ``train_config.yaml``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.whole_model import is_model_level
from peftkit.foundation.errors import UsageError
from peftkit.foundation.quantization import describe_precision
from peftkit.model import PeftModel, wrap
from peftkit.objectives import Objective
from peftkit.objectives.choice import OPTION_NAMES, PreferenceSettings
from peftkit.objectives.pair_batch import collate_pairs
from peftkit.objectives.preference import preference_objective
from peftkit.objectives.sequences import shares_prompts
from peftkit.objectives.tokens import token_objective
from peftkit.training.data import (
    PreparedData,
    check_data,
    collate,
    collate_packed,
    pack_training_rows,
    packing_blocker,
    prepare_data,
)
from peftkit.training.evaluation import headline_metric, pad_token_id
from peftkit.training.loop.context import RunContext, set_threads
from peftkit.training.loop.order import BatchOrder
from peftkit.training.loop.reference import check_reference, load_reference_adapter
from peftkit.training.method_choice import build_method_config
from peftkit.training.optimization import build_optimizer, build_scheduler, check_optimizer
from peftkit.training.reports import trainable_table
from peftkit.training.run_directory import (
    base_model_config,
    check_output_dir,
    load_base_model,
    prepare_output_dir,
)
from peftkit.training.sharding import check_shardable, shard
from peftkit.training.train_config import TrainConfig

__all__ = ["RunSetup", "apply_method", "preference_settings", "set_up", "with_checkpointing"]


@dataclass
class RunSetup:
    """What the steps work on, fixed once the run is set up."""

    model: nn.Module  # unwrapped: saved, evaluated, passed to on_step
    wrapped: nn.Module  # accelerate's (DDP) wrapper: the forward and backward go through it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[nn.Parameter]  # the trainable ones, for gradient clipping
    tokenizer: Any
    data: PreparedData
    train_rows: list[dict[str, Any]]  # input_ids and labels (packed: and lengths; pairs: prompt, chosen,
    # rejected ids) per row
    targets: list[int]  # what each training row's loss is divided by: its answer tokens (pairs: 1)
    objective: Objective  # (model, batch) -> (loss_sum, count)
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, Any]]  # rows -> the objective's batch
    preference: PreferenceSettings | None  # the preference objective's settings (None: sft)
    order: BatchOrder
    pad_id: int
    total_steps: int
    metric: str  # the headline metric


def set_up(context: RunContext) -> RunSetup:
    """Check, load, wrap, shard, build the optimizer and schedule, create the output directory, report.

    Raises:
        UsageError: bad input, found before anything is written.
    """
    config = context.config
    set_threads(context)
    check_output_dir(config)
    context.wait_for_everyone()  # every process checks before any writes
    method_config = build_method_config(config.method, config.method_options, config.task)
    check_optimizer(config, method_config)
    if context.sharded:
        check_shardable(config.quantize, is_model_level(method_config), config.save_every, config.resume)
    precision = describe_precision(config.quantize, config.dtype, config.quantize_options)
    context.say(f"peftkit train: {config.method} on {config.model} ({config.task}, {precision})")
    check_data(config)  # bad data is reported before the model loads
    check_reference(config)
    model, tokenizer, data = _load(config, method_config)
    blocker = packing_blocker(config, model, method_config)
    data = pack_training_rows(data, config, blocker)
    if config.labels:
        context.say(head_note(config, full_model=method_config is None))
    if context.sharded:
        shard(model)
    order = _batch_order(context, data, bucketed=blocker is not None and config.objective == "sft")
    total_steps = config.max_steps or math.ceil(config.epochs * order.steps_per_epoch)
    metric = _headline_metric(config, data)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    if context.main:
        prepare_output_dir(config)
    context.wait_for_everyone()
    if context.sharded:  # the model is sharded in place; accelerate would wrap it in DDP
        wrapped, optimizer = model, context.accelerator.prepare(optimizer)
    else:
        wrapped, optimizer = context.accelerator.prepare(model, optimizer)
    context.say(setup_report(context, model, data, total_steps, order, metric))
    pad_id = pad_token_id(tokenizer)
    preference, columns, objective, batches = _objective_parts(config, model, pad_id, data.packed)
    return RunSetup(
        model=model,
        wrapped=wrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        tokenizer=tokenizer,
        data=data,
        train_rows=data.train.select_columns(columns).to_list(),
        targets=data.train["targets"],
        objective=objective,
        collate=batches,
        preference=preference,
        order=order,
        pad_id=pad_id,
        total_steps=total_steps,
        metric=metric,
    )


def _batch_order(context: RunContext, data: PreparedData, bucketed: bool) -> BatchOrder:
    """The order of the run's training rows: padded rows in length buckets where ``bucketed`` (packing
    cannot apply; preference pairs keep TRL's order), else shuffled."""
    config = context.config
    return BatchOrder(
        len(data.train),
        config.batch_size,
        config.grad_accum,
        context.world,
        context.rank,
        config.seed,
        lengths=data.lengths if bucketed else None,
        what="packed rows" if data.packed else "training rows",
    )


def _headline_metric(config: TrainConfig, data: PreparedData) -> str:
    """The run's headline metric: a preference run's ``auto`` is its preference accuracy."""
    if config.objective != "sft" and config.metric == "auto":
        return "preference_accuracy"
    references = data.validation["references"] if data.validation is not None else []
    return headline_metric(config.metric, config.task, references)


def _objective_parts(
    config: TrainConfig, model: nn.Module, pad_id: int, packed: bool
) -> tuple[
    PreferenceSettings | None, list[str], Objective, Callable[[Sequence[dict[str, Any]]], dict[str, Any]]
]:
    """The preference settings (None: sft), the training rows' columns, the objective and the collate
    (``packed`` rows: one sequence per micro-batch, else padded rows)."""
    if config.objective == "sft":
        return (
            None,
            ["input_ids", "labels", *(["lengths"] * packed)],
            token_objective(config.task),
            collate_packed if packed else functools.partial(collate, pad_id=pad_id),
        )
    preference = preference_settings(config)
    batches = functools.partial(collate_pairs, pad_id=pad_id, shared_prompt=shares_prompts(model))
    return preference, ["prompt_ids", "chosen_ids", "rejected_ids"], preference_objective(preference), batches


def preference_settings(config: TrainConfig) -> PreferenceSettings:
    """The preference objective of ``config`` (``beta``… filled with the objective's defaults)."""
    options = {name: getattr(config, name) for name in OPTION_NAMES if name != "reference"}
    return PreferenceSettings.of(config.objective, **options)


def _load(config: TrainConfig, method_config: Any) -> tuple[nn.Module, Any, PreparedData]:
    """The base model with the method applied (seeded), its tokenizer, and the tokenized data."""
    from accelerate.utils import set_seed

    model, tokenizer = load_base_model(config)  # seq-cls: a head of len(config.labels) outputs
    data = prepare_data(config, tokenizer)
    set_seed(config.seed)  # adapter initialisation
    if config.reference is not None:  # DPO continuing from an adapter: it is the reference and the start
        return with_checkpointing(load_reference_adapter(model, config), config), tokenizer, data
    return apply_method(model, method_config, config), tokenizer, data


def head_note(config: TrainConfig, full_model: bool) -> str:
    """A classifier's labels, and whether its head is new: the run's label count is not its checkpoint's
    (the head is then initialised afresh, as transformers' ``ignore_mismatched_sizes`` does)."""
    labels = config.labels or []
    named = f"labels: {', '.join(f'{i}={name}' for i, name in enumerate(labels))}"
    found = base_model_config(config).num_labels
    if found == len(labels):
        return named
    kept = "the model" if full_model else "the adapter (modules_to_save)"
    return (
        f"{named}; {config.model} has {found} (config.json num_labels), so a new {len(labels)}-label "
        f"head is initialised, trained and saved with {kept}"
    )


def apply_method(model: nn.Module, method_config: Any, config: TrainConfig) -> nn.Module:
    """``model`` made trainable by the method: wrapped with ``method_config``, or every parameter
    trainable for full fine-tuning (``method_config`` None); gradient checkpointing on if asked.

    Raises:
        UsageError: the method cannot be applied to this model (no target found…).
    """
    if method_config is None:  # full fine-tuning
        model.requires_grad_(True)
    else:
        try:
            model = wrap(model, method_config)
        except ValueError as e:
            raise UsageError(f"method {config.method!r}: {e}") from e
    return with_checkpointing(model, config)


def with_checkpointing(model: nn.Module, config: TrainConfig) -> nn.Module:
    """``model`` with gradient checkpointing on when ``config`` asks for it."""
    if config.gradient_checkpointing:
        if isinstance(model, PeftModel):
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def setup_report(
    context: RunContext, model: nn.Module, data: PreparedData, total: int, order: BatchOrder, metric: str
) -> str:
    """What the run will do: the data (truncated, packed, held out), the steps, the trainable table."""
    config, stats = context.config, data.stats
    what = "examples" if config.objective == "sft" else f"pairs ({config.objective})"
    lines = [f"data: {stats['examples']} training {what}"]
    if stats.get("truncated"):
        dropped = stats.get("dropped")
        lines.append(
            f"  {stats['truncated']} truncated to max_length={config.max_length}"
            + (f", {dropped} of them dropped (no answer token left)" if dropped else "")
        )
    if data.padding_free:
        lines.append(f"  {data.packing}, each example attending only to itself")
    elif data.packed:
        lines.append(
            f"  packed into {stats['packed_rows']} rows of up to {config.max_length} tokens, each example "
            f"attending only to itself: {data.packing}"
        )
    else:
        lines.append(f"  one example per row, padded to the longest of its batch; packing {data.packing}")
    validation = len(data.validation) if data.validation is not None else 0
    generated = min(config.eval_examples, validation) if config.task != "seq-cls" else 0
    scored = f" (loss on all, the first {generated} also by generation)" if generated else ""
    unit = "rows" if config.objective == "sft" else "pairs"
    lines.append(f"  {validation} held-out {unit}{scored}; headline metric: {metric}")
    lines.append(
        f"steps: {total} of {order.global_batch_size} {unit} ({total / order.steps_per_epoch:.2f} epochs), "
        f"{context.world} process(es)"
        + (f", {torch.get_num_threads()} CPU thread(s) each" if context.device.type == "cpu" else "")
        + (", parameters sharded (FSDP2)" if context.sharded else "")
    )
    if config.fsdp and not context.sharded:
        lines.append("fsdp: one process, nothing to shard (start with torchrun --nproc_per_node N)")
    return "\n".join(lines) + "\n" + trainable_table(model)
