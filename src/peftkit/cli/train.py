"""``peftkit train [CONFIG.yaml] [--key value ...]``: fine-tune a model."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from peftkit.cli.common import EXIT_INTERRUPTED, add_config_flags, parse_train_args
from peftkit.cli.estimate import run_estimate_text

__all__ = ["register_train", "run_train"]


def register_train(subparsers: Any) -> None:
    """``peftkit train [CONFIG.yaml] [--key value ...]``."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model (no arguments: LoRA on SmolLM2-135M-Instruct, a few minutes on CPU)",
        description="Fine-tune a model with any method. With no arguments: LoRA r=8 on the attention "
        "projections of SmolLM2-135M-Instruct, on the bundled person-json task (sentence -> one line of "
        "JSON, scored by exact match). Every YAML key is also a flag; method options (e.g. --r 16, "
        "--lora-alpha 32, --target-modules q_proj,v_proj) too. See examples/train.yaml.",
    )
    add_config_flags(parser)
    parser.set_defaults(handler=run_train, parser=parser, own_flags=True)


def run_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    _, config = parse_train_args(args.parser, argv)  # --help and bad flags end here, before torch loads
    if config.estimate_only:
        print(run_estimate_text(config))
        return 0
    from peftkit.training.loop import train

    result = train(config)
    if result.stopped == "interrupted":
        return EXIT_INTERRUPTED
    return 1 if result.stopped else 0
