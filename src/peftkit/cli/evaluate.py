"""``peftkit eval RUN [--data FILE]``: score a trained run on held-out data."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from peftkit.cli.common import add_run_arguments
from peftkit.errors import UsageError

__all__ = ["register_eval", "run_eval"]


def register_eval(subparsers: Any) -> None:
    """``peftkit eval RUN [--data FILE]``."""
    parser = subparsers.add_parser(
        "eval",
        help="score a trained run (or adapter) on held-out data",
        description="Loss, perplexity and the generation metrics (exact match, ROUGE-1/2/L; accuracy for "
        "seq-cls) of a trained run on its held-out rows or on --data.",
    )
    add_run_arguments(parser, "output_dir of peftkit train, or an adapter directory")
    parser.add_argument("--data", help="score on this file (all rows) instead of the run's held-out rows")
    parser.add_argument(
        "--examples", type=int, help="rows scored by generation (default: the run's eval_examples)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=0, help="generation length (0: automatic)")
    parser.add_argument("--base", action="store_true", help="score the base model without the adapter")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from peftkit.training.data import prepare_data
    from peftkit.training.evaluation import evaluate, headline_metric
    from peftkit.training.runs import load_run

    model, tokenizer, config = load_run(args.run_dir, args.model, adapter=not args.base)
    if args.data:
        config = config.replace(validation_data=args.data)
    data = prepare_data(config, tokenizer)
    if data.validation is None or len(data.validation) == 0:
        raise UsageError("no held-out rows to score; pass --data FILE")
    examples = config.eval_examples if args.examples is None else args.examples
    result = evaluate(
        model, tokenizer, data.validation, config.task, examples, args.max_new_tokens, config.batch_size
    )
    metric = headline_metric(config.metric, config.task, data.validation["references"])
    which = "base model" if args.base else args.run_dir
    print(f"{which} on {len(data.validation)} held-out rows (headline metric: {metric})")
    for name, value in result.items():
        if isinstance(value, float):
            print(f"  {name:12s} {value:.4f}")
    for sample in result.get("samples", [])[:2]:
        print(f"  e.g. {sample['answer']!r} (reference {sample['reference']!r})")
    return 0
