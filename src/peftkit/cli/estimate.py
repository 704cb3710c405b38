"""``peftkit estimate [MODEL] [--r 16 --batch 4 --seq 256 ...]`` and ``train --estimate-only``: predicted
memory, full fine-tuning next to LoRA."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peftkit.errors import UsageError
from peftkit.training.config import TrainConfig

if TYPE_CHECKING:
    from peftkit.memory import MemoryEstimate

__all__ = ["add_estimate_arguments", "estimate_run", "register_estimate", "run_estimate"]


def register_estimate(subparsers: Any) -> None:
    """``peftkit estimate [MODEL] [--r 16 --batch 4 --seq 256 ...]``."""
    parser = subparsers.add_parser(
        "estimate",
        help="predict a training step's peak memory: full fine-tuning next to LoRA",
        description="Predict the memory of one training step from the model's config.json alone (the "
        "model is built on the meta device; no weights are read): weights, gradients, optimizer states, "
        "activations and the peak, full fine-tuning next to LoRA. Models decoder LMs (Llama, Mistral, "
        "Qwen2, SmolLM2; GPT-2 approximately); not the runtime's own memory (CUDA context, allocator "
        "cache). For a run's settings: peftkit train ... --estimate-only.",
    )
    add_estimate_arguments(parser)
    parser.set_defaults(handler=run_estimate)


def run_estimate(args: argparse.Namespace, argv: Sequence[str]) -> int:

    from peftkit.memory import format_estimate

    try:
        result = estimate_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_estimate(result))
    return 0


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``estimate``'s arguments (MODEL, --method, --r, --targets, --batch, --seq, --dtype, …)."""
    from peftkit.models import DEFAULT_MODEL

    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="config dir, Hub id, or the default")
    parser.add_argument("--method", default="lora", choices=["lora"])
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated names")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    # checked by peftkit.memory.estimate, so that building the parser does not import torch
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    parser.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit or sgd (default: adamw)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--device-memory", type=float, default=None, help="GiB available")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def estimate_from_args(args: argparse.Namespace) -> MemoryEstimate:
    """:func:`peftkit.memory.estimate` for arguments parsed with :func:`add_estimate_arguments`."""
    from peftkit.memory import estimate

    targets = args.targets if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
    return estimate(
        args.model,
        method=args.method,
        r=args.r,
        targets=targets,
        batch=args.batch,
        seq=args.seq,
        dtype=args.dtype,
        optimizer=args.optimizer,
        grad_checkpointing=args.grad_checkpointing,
        device_memory=args.device_memory,
        lora_dropout=args.lora_dropout,
    )


def estimate_run(config: TrainConfig) -> str:
    """The predicted memory of a ``peftkit train`` run, from its settings alone (``--estimate-only``).

    ``batch_size`` rows of ``max_length`` tokens (the longest a batch can be), the run's ``dtype`` and
    ``gradient_checkpointing``, AdamW. The table has full fine-tuning next to the run's LoRA; for method
    ``full`` the LoRA column is ``peftkit train``'s default LoRA, for comparison.

    Raises:
        UsageError: a method other than ``lora`` and ``full`` (DoRA included), a task other than
            ``causal-lm``, or a model whose config cannot be read or is not a decoder LM.
    """
    from peftkit.memory import estimate, format_estimate
    from peftkit.methods.lora import LoraConfig
    from peftkit.training.method_choice import build_method_config

    refusal = "--estimate-only models full fine-tuning and LoRA only"
    if config.task != "causal-lm":
        raise UsageError(f"{refusal}, on decoder language models: task {config.task!r} is not modelled")
    if config.method == "full":
        lora = build_method_config("lora", {}, config.task)
        this_run = "this run: full fine-tuning (the LoRA column is peftkit train's default LoRA, to compare)"
    else:
        lora = build_method_config(config.method, config.method_options, config.task)
        this_run = "this run: the LoRA column (full fine-tuning shown to compare)"
    if type(lora) is not LoraConfig or lora.use_dora:
        raise UsageError(
            f"{refusal}: method {config.method!r} is not modelled; use --method lora or --method full"
        )
    try:
        result = estimate(
            config.model,
            method=lora,
            batch=config.batch_size,
            seq=config.max_length,
            dtype=config.dtype,
            grad_checkpointing=config.gradient_checkpointing,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    notes = [this_run]
    if config.bf16:
        notes.append("bf16 autocast is not modelled: the estimate assumes arithmetic in the weights' dtype")
    return "\n".join([format_estimate(result), *notes])
