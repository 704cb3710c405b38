"""``peftkit estimate [MODEL] [--r 16 --batch 4 --seq 256 ...]`` and ``train --estimate-only``: predicted
memory, full fine-tuning next to LoRA."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peftkit.foundation.errors import UsageError
from peftkit.training.train_config import TrainConfig

if TYPE_CHECKING:
    from peftkit.memory import MemoryEstimate

__all__ = ["add_estimate_arguments", "register_estimate", "run_estimate", "run_estimate_text"]


def register_estimate(subparsers: Any) -> None:
    """``peftkit estimate [MODEL] [--r 16 --batch-size 4 --max-length 256 ...]``."""
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
        if args.budget:
            return _run_plan(args)
        result = estimate_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_estimate(result))
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    import dataclasses

    from peftkit.memory.planner import format_plan, parse_size, plan

    budget = parse_size(args.budget)
    # the planner varies batch, quantization and checkpointing itself
    rows = plan(args.model, budget, args.max_length, **_shared_settings(args))
    if args.json:
        print(json.dumps([dataclasses.asdict(row) for row in rows], indent=2))
    else:
        print(format_plan(rows, args.model, budget, args.max_length))
    return 0


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``estimate``'s arguments: MODEL, then ``peftkit train``'s flag names and defaults (the older
    ``--targets``, ``--batch``, ``--seq``, ``--grad-checkpointing`` still work)."""
    from peftkit.foundation.loading import DEFAULT_MODEL
    from peftkit.methods import method_by_name
    from peftkit.training.train_config import FIELDS

    lora = method_by_name("lora").defaults
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="config dir, Hub id, or the default")
    parser.add_argument("--method", default="lora", choices=["lora"])
    parser.add_argument("--r", type=int, default=lora["r"], help=f"LoRA rank (default: {lora['r']})")
    parser.add_argument("--lora-alpha", type=float, default=lora["lora_alpha"])
    parser.add_argument(
        "--target-modules",
        "--targets",
        dest="target_modules",
        default=None,
        help="'all-linear' or comma-separated names (default: the model's attention projections, as "
        "peftkit train)",
    )
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument(
        "--batch-size", "--batch", dest="batch_size", type=int, default=FIELDS["batch_size"].default
    )
    parser.add_argument(
        "--max-length",
        "--seq",
        dest="max_length",
        type=int,
        default=FIELDS["max_length"].default,
        help="tokens per row",
    )
    # checked by peftkit.memory.estimate, so that building the parser does not import torch
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    parser.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit or sgd (default: adamw)")
    parser.add_argument(
        "--loss", default="model", help="model (logits, then cross-entropy) or fused (peftkit train's)"
    )
    parser.add_argument("--padded", action="store_true", help="rows of different lengths (an attention mask)")
    parser.add_argument(
        "--quantize", default="none", help="none, nf4, fp4 or int8: a QLoRA base for the LoRA column"
    )
    parser.add_argument(
        "--gradient-checkpointing", "--grad-checkpointing", dest="gradient_checkpointing", action="store_true"
    )
    parser.add_argument("--device-memory", type=float, default=None, help="GiB available")
    parser.add_argument(
        "--budget",
        help="what fits in this much memory (e.g. 8GiB): full / LoRA / QLoRA x checkpointing, largest batch",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def estimate_from_args(args: argparse.Namespace) -> MemoryEstimate:
    """:func:`peftkit.memory.estimate` for arguments parsed with :func:`add_estimate_arguments`."""
    from peftkit.memory import estimate

    return estimate(
        args.model,
        batch=args.batch_size,
        seq=args.max_length,
        grad_checkpointing=args.gradient_checkpointing,
        device_memory=args.device_memory,
        quantize=None if args.quantize == "none" else args.quantize,
        **_shared_settings(args),
    )


def _shared_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``estimate()`` settings a single estimate and the ``--budget`` plan both take from the flags."""
    targets = args.target_modules
    if targets not in (None, "all-linear"):
        targets = [t for t in targets.split(",") if t]
    return {
        "method": args.method,
        "r": args.r,
        "targets": targets,
        "dtype": args.dtype,
        "optimizer": args.optimizer,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "loss": args.loss,
        "padded": args.padded,
    }


def run_estimate_text(config: TrainConfig) -> str:
    """The table ``peftkit train --estimate-only`` prints (:func:`peftkit.training.estimate.estimate_run`)."""
    from peftkit.memory import format_estimate
    from peftkit.training.estimate import estimate_run

    result, notes = estimate_run(config)
    return "\n".join([format_estimate(result), *notes])
