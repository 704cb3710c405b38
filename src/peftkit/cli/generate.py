"""``peftkit generate RUN PROMPT...``: answer prompts with a trained run, adapter or model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from peftkit.cli.common import add_run_arguments

__all__ = ["register_generate", "run_generate"]


def register_generate(subparsers: Any) -> None:
    """``peftkit generate RUN PROMPT...``."""
    parser = subparsers.add_parser(
        "generate",
        help="answer prompts with a trained run (or adapter, or model directory)",
        description="Answer each prompt greedily (a classifier, task seq-cls, prints each text's label). "
        "A run's prompt_template, system_prompt and the chat template are applied, so pass just the "
        "input (e.g. the sentence for person-json); a directory without train_config.yaml gets your "
        "text as is, in the model's chat template. '-' reads prompts from stdin, one a line.",
    )
    add_run_arguments(parser, "output_dir of peftkit train, an adapter or a model dir")
    parser.add_argument("prompts", nargs="+", help="prompts ('-': one a line from stdin)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="longest answer in tokens (default: 64)"
    )
    parser.add_argument("--raw", action="store_true", help="do not apply the run's prompt_template")
    parser.add_argument("--base", action="store_true", help="answer with the base model (adapter off)")
    parser.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from peftkit.training.evaluation import generate_answers
    from peftkit.training.runs import build_prompt, is_recorded, load_run

    prompts = [
        line for p in args.prompts for line in (sys.stdin.read().splitlines() if p == "-" else [p]) if line
    ]
    model, tokenizer, config = load_run(args.run_dir, args.model, adapter=not args.base)
    if config.task == "seq-cls":  # a classifier has no text to generate: it names a label
        answers = _labels(model, tokenizer, config, prompts)
        for prompt, answer in zip(prompts, answers, strict=True):
            print(answer if len(prompts) == 1 else f"{prompt}\n-> {answer}\n")
        return 0
    if not is_recorded(args.run_dir):
        print(_unrecorded_note(args.run_dir, tokenizer, config.task), file=sys.stderr)
    encoded = [build_prompt(config, prompt, tokenizer, raw=args.raw) for prompt in prompts]
    for prompt, answer in zip(
        prompts, generate_answers(model, tokenizer, encoded, config.task, args.max_new_tokens), strict=True
    ):
        print(answer if len(prompts) == 1 else f"{prompt}\n-> {answer}\n")
    return 0


def _labels(model: Any, tokenizer: Any, config: Any, texts: list[str]) -> list[str]:
    """The label a classifier gives each text: the model's ``id2label`` names (a run's recorded labels
    since they are recorded), or, where those are transformers' placeholders (``LABEL_0``…: a run of
    older peftkit) and the run records its data, the data's label names in the order training
    numbered them."""
    from peftkit.training.data import prepare_data
    from peftkit.training.evaluation import classify

    classes = classify(model, tokenizer, texts)
    id2label = dict(getattr(model.config, "id2label", None) or {})
    names = [str(id2label.get(i, f"LABEL_{i}")) for i in range(model.config.num_labels)]
    if config.data and all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        names = prepare_data(config, tokenizer).label_names or names
    return [names[i] for i in classes]


def _unrecorded_note(run_dir: str, tokenizer: Any, task: str) -> str:
    """The line saying how prompts are built for a directory without ``train_config.yaml``."""
    if task == "seq2seq-lm":
        how = "your text as is"
    elif getattr(tokenizer, "chat_template", None):
        how = "the model's chat template and your text as is"
    else:
        how = "your text as is, then a blank line (the model has no chat template)"
    return f"no train_config.yaml in {run_dir}: no recorded instruction or system prompt; using {how}"
