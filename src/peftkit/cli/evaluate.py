"""``peftkit eval RUN [--data FILE]``: score a trained run on held-out data."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftkit.cli.common import add_run_arguments
from peftkit.foundation.errors import UsageError

__all__ = ["register_eval", "run_eval"]


def register_eval(subparsers: Any) -> None:
    """``peftkit eval RUN [--data FILE]``."""
    parser = subparsers.add_parser(
        "eval",
        help="score a trained run (or adapter, or model directory) on held-out data",
        description="Loss, perplexity and the generation metrics (exact match, ROUGE-1/2/L; accuracy for "
        "seq-cls) of a trained run on its held-out rows or on --data. A directory without "
        "train_config.yaml records no data and no prompt settings: pass --data; its rows are used as "
        "they are, in the model's chat template.",
    )
    add_run_arguments(parser, "output_dir of peftkit train, an adapter or a model dir")
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
    from peftkit.training.runs import is_recorded, load_run

    recorded = is_recorded(args.run_dir)
    if not recorded and not args.data and Path(args.run_dir).is_dir():
        raise UsageError(
            f"{args.run_dir} has no train_config.yaml, so no held-out data is recorded; pass --data FILE "
            "(a .jsonl/.json/.csv/.parquet file of prompts and answers) to score on"
        )
    model, tokenizer, config = load_run(args.run_dir, args.model, adapter=not args.base)
    if args.data:
        changes: dict[str, Any] = {"validation_data": args.data, "validation_rows": 0}
        if config.task != "seq-cls" or not recorded:  # only classification reads training rows (labels)
            changes["data"] = args.data
        config = config.replace(**changes)
    if not recorded:
        print(
            f"no train_config.yaml in {args.run_dir}: scoring the rows of {args.data} as they are (no "
            "recorded instruction or system prompt), in the model's chat template",
            file=sys.stderr,
        )
    data = prepare_data(config, tokenizer)
    if data.validation is None or len(data.validation) == 0:
        raise UsageError("no held-out rows to score; pass --data FILE")
    examples = config.eval_examples if args.examples is None else args.examples
    if config.objective != "sft":
        return _eval_pairs(args, model, tokenizer, config, data.validation, examples)
    result = evaluate(
        model,
        tokenizer,
        data.validation,
        config.task,
        examples,
        args.max_new_tokens,
        config.batch_size,
        progress=True,
    )
    metric = headline_metric(config.metric, config.task, data.validation["references"])
    which = "base model" if args.base else args.run_dir
    rows = len(data.validation)
    print(f"{which} on {rows} held-out rows of {_source(config)} (headline metric: {metric})")
    if "scored" in result:
        print(
            f"  all {rows} rows scored by loss/perplexity, the first {result['scored']} also by generation "
            "(exact match, ROUGE; --examples)"
        )
    for name, value in result.items():
        if isinstance(value, float):
            print(f"  {name:12s} {value:.4f}")
    padding = f"  padding tokens computed: {result['padding_tokens']:,} scoring the loss"
    if "prompt_padding_tokens" in result:
        padding += f", {result['prompt_padding_tokens']:,} in the prompts generated from"
    print(padding)
    for sample in result.get("samples", [])[:2]:
        print(f"  e.g. {sample['answer']!r} (reference {sample['reference']!r})")
    return 0


def _eval_pairs(
    args: argparse.Namespace, model: Any, tokenizer: Any, config: Any, rows: Any, examples: int
) -> int:
    """A preference run: its objective's loss, reward margin and preference accuracy on held-out pairs
    (DPO's reference scored now), and which answer the greedy generations give."""
    import functools

    from peftkit.objectives.pair_batch import collate_pairs
    from peftkit.objectives.sequences import shares_prompts
    from peftkit.training.evaluation import pad_token_id
    from peftkit.training.loop.reference import with_reference_log_probs
    from peftkit.training.loop.setup import preference_settings
    from peftkit.training.pair_evaluation import evaluate_pairs

    settings = preference_settings(config)
    collate = functools.partial(
        collate_pairs, pad_id=pad_token_id(tokenizer), shared_prompt=shares_prompts(model)
    )
    if settings.uses_reference:
        rows = with_reference_log_probs(model, rows, collate, 2 * config.batch_size, config.reference)
    result = evaluate_pairs(
        model, tokenizer, rows, settings, collate, examples, args.max_new_tokens, 2 * config.batch_size
    )
    which = "base model" if args.base else args.run_dir
    print(
        f"{which} on {len(rows)} held-out pairs of {_source(config)} ({config.objective}; headline metric: "
        "preference_accuracy)"
    )
    for name, value in result.items():
        if isinstance(value, float):
            print(f"  {name:20s} {value:.4f}")
    for sample in result.get("samples", [])[:2]:
        print(f"  e.g. {sample['answer']!r} (chosen {sample['reference']!r})")
    return 0


def _source(config: Any) -> str:
    """Where the held-out rows come from, in words."""
    from peftkit.training.tasks import builtin_task

    if config.validation_data:
        return str(config.validation_data)
    if builtin_task(config.data) is not None:
        return f"the bundled task {config.data}"
    return f"{config.data} ({config.validation_split:.0%} held out, seed {config.seed})"
