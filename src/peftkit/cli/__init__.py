"""The ``peftkit`` command: ``train``, ``eval``, ``generate``, ``merge``, ``inspect``, ``estimate``,
``compare`` (its register function lives in ``peftkit.cli.compare``).

Each subcommand is one ``register_<name>(subparsers)`` function that adds its parser and sets
``handler=<function(args, argv) -> exit code>``; :data:`COMMANDS` lists them. To add a subcommand,
write its register function next to its code and append it to :data:`COMMANDS`.

Bad input (a ``UsageError``) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from peftkit.cli.compare import register_compare
from peftkit.errors import UsageError
from peftkit.training.config import FIELDS, TrainConfig, closest, load_config, parse_value

__all__ = ["COMMANDS", "build_parser", "main", "parse_train_args"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------- train flags
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every :class:`TrainConfig` key (defaults suppressed, so only given flags override)."""
    parser.add_argument("config", nargs="?", help="YAML file of settings (flags override it)")
    group = parser.add_argument_group("settings (YAML keys; method options such as --r 16 are accepted too)")
    for name, f in FIELDS.items():
        kind = str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{f.metadata['help']} (default: {default})"
        names = [_flag(name)] + ([f"--{name}"] if "_" in name else [])
        if kind.startswith("bool"):
            group.add_argument(
                *names, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
        else:
            meta = "{" + ",".join(f.metadata["choices"]) + "}" if "choices" in f.metadata else name.upper()
            group.add_argument(
                *names, dest=name, type=parse_value, default=argparse.SUPPRESS, metavar=meta, help=text
            )


def split_method_flags(
    argv: Sequence[str], parser: argparse.ArgumentParser
) -> tuple[list[str], dict[str, Any]]:
    """Separate flags the parser does not know (method options such as ``--r 16``) from the rest."""
    known = {s for action in parser._actions for s in action.option_strings}
    rest: list[str] = []
    extra: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        name = token.split("=", 1)[0]
        if token.startswith("--") and len(token) > 2 and name not in known:
            if "=" in token:
                value = token.split("=", 1)[1]
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1
                value = args[i]
            else:
                value = "true"
            extra[name[2:].replace("-", "_")] = parse_value(value)
        else:
            rest.append(token)
        i += 1
    return rest, extra


def parse_train_args(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, TrainConfig]:
    """Parse ``peftkit train``-style arguments into the namespace and the resulting config.

    Raises:
        UsageError: an unknown key (neither a setting nor an option of the chosen method), with the
            closest known one, or a bad value.
    """
    from peftkit.training.method_choice import method_fields

    rest, extra = split_method_flags(argv, parser)
    args = parser.parse_args(rest)
    given = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    config = load_config(args.config, given)
    if extra:
        options = method_fields(config.method)
        for key in extra:
            if key not in options:
                flags = [_flag(name) for name in [*FIELDS, *options]]
                raise UsageError(
                    f"unknown setting {_flag(key)}: not a peftkit train setting nor an option of method "
                    f"{config.method!r}{closest(_flag(key), flags)}"
                )
        config = config.replace(method_options=extra)
    return args, config


# ---------------------------------------------------------------------------------------- subcommands
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
    from peftkit.training.loop import train

    _, config = parse_train_args(args.parser, argv)
    if config.estimate_only:
        print(estimate_run(config))
        return 0
    result = train(config)
    if result.stopped == "interrupted":
        return EXIT_INTERRUPTED
    return 1 if result.stopped else 0


def estimate_run(config: TrainConfig) -> str:
    """The predicted memory of a ``peftkit train`` run, from its settings alone (``--estimate-only``).

    ``batch_size`` rows of ``max_length`` tokens (the longest a batch can be), the run's ``dtype`` and
    ``gradient_checkpointing``, AdamW. The table has full fine-tuning next to the run's LoRA; for method
    ``full`` the LoRA column is ``peftkit train``'s default LoRA, for comparison.

    Raises:
        UsageError: a method other than ``lora`` and ``full`` (DoRA included), a task other than
            ``causal-lm``, or a model whose config cannot be read or is not a decoder LM.
    """
    import peftkit
    from peftkit.memory import estimate, format_estimate
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
    if type(lora) is not peftkit.LoraConfig or lora.use_dora:
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


def _add_run_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The RUN positional and ``--model`` that eval, generate and merge share."""
    parser.add_argument("run_dir", metavar="RUN", help=what)
    parser.add_argument("--model", help="base model, if not the one the run records")


def register_eval(subparsers: Any) -> None:
    """``peftkit eval RUN [--data FILE]``."""
    parser = subparsers.add_parser(
        "eval",
        help="score a trained run (or adapter) on held-out data",
        description="Loss, perplexity and the generation metrics (exact match, ROUGE-1/2/L; accuracy for "
        "seq-cls) of a trained run on its held-out rows or on --data.",
    )
    _add_run_arguments(parser, "output_dir of peftkit train, or an adapter directory")
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


def register_generate(subparsers: Any) -> None:
    """``peftkit generate RUN PROMPT...``."""
    parser = subparsers.add_parser(
        "generate",
        help="answer prompts with a trained run (or adapter, or model directory)",
        description="Answer each prompt greedily. A run's prompt_template and chat template are applied, "
        "so pass just the input (e.g. the sentence for person-json). '-' reads prompts from stdin, "
        "one a line.",
    )
    _add_run_arguments(parser, "output_dir of peftkit train, an adapter or a model dir")
    parser.add_argument("prompts", nargs="+", help="prompts ('-': one a line from stdin)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="longest answer in tokens (default: 64)"
    )
    parser.add_argument("--raw", action="store_true", help="do not apply the run's prompt_template")
    parser.add_argument("--base", action="store_true", help="answer with the base model (adapter off)")
    parser.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from peftkit.training.data import encode
    from peftkit.training.evaluation import generate_answers
    from peftkit.training.runs import apply_prompt_template, load_run

    prompts = [
        line for p in args.prompts for line in (sys.stdin.read().splitlines() if p == "-" else [p]) if line
    ]
    model, tokenizer, config = load_run(args.run_dir, args.model, adapter=not args.base)
    encoded = []
    for prompt in prompts:
        text = prompt if args.raw else apply_prompt_template(config.prompt_template, prompt)
        messages = ([{"role": "system", "content": config.system_prompt}] if config.system_prompt else []) + [
            {"role": "user", "content": text},
            {"role": "assistant", "content": ""},
        ]
        if config.task == "seq2seq-lm":
            encoded.append(tokenizer(text)["input_ids"])
        else:
            encoded.append(encode(tokenizer, messages)[2])
    for prompt, answer in zip(
        prompts, generate_answers(model, tokenizer, encoded, config.task, args.max_new_tokens), strict=True
    ):
        print(answer if len(prompts) == 1 else f"{prompt}\n-> {answer}\n")
    return 0


def register_merge(subparsers: Any) -> None:
    """``peftkit merge RUN OUT``."""
    parser = subparsers.add_parser(
        "merge",
        help="fold a trained adapter into its base model and save a plain transformers model",
        description="Merge the adapter into the base weights and save_pretrained the result (with the "
        "tokenizer): transformers loads it with from_pretrained, no peftkit needed.",
    )
    _add_run_arguments(parser, "output_dir of peftkit train, or an adapter directory")
    parser.add_argument("out", help="directory for the merged model")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty OUT")
    parser.set_defaults(handler=run_merge)


def run_merge(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import shutil

    import peftkit
    from peftkit.training.runs import load_run

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} exists and is not empty; pass --overwrite to replace it")
    model, tokenizer, _ = load_run(args.run_dir, args.model)
    if not isinstance(model, peftkit.PeftModel):
        raise UsageError(f"{args.run_dir} holds no adapter to merge (a full fine-tuning run is a model)")
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except (ValueError, NotImplementedError) as e:
        raise UsageError(f"cannot merge {args.run_dir}: {e}") from e
    if out.exists():
        shutil.rmtree(out)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out}; load it with transformers' from_pretrained({str(out)!r})")
    return 0


def register_inspect(subparsers: Any) -> None:
    """``peftkit inspect [CONFIG.yaml] [--model M] [--method ...]``."""
    parser = subparsers.add_parser(
        "inspect",
        help="list a model's modules, what a method config targets, and the trainable parameters",
        description="Print the model's modules (type, weight shape, parameters), the modules the method "
        "config would adapt, and the trainable-parameter table. Takes the same settings as train.",
    )
    add_config_flags(parser)
    parser.add_argument("--filter", default=None, help="only list modules whose name matches this regex")
    parser.add_argument("--no-modules", dest="modules", action="store_false", help="skip the module list")
    parser.set_defaults(handler=run_inspect, parser=parser, own_flags=True)


def run_inspect(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from peftkit.training.inspection import inspect_model

    parsed, config = parse_train_args(args.parser, argv)
    print(inspect_model(config, parsed.filter, parsed.modules))
    return 0


def register_estimate(subparsers: Any) -> None:
    """``peftkit estimate [MODEL] [--r 16 --batch 4 --seq 256 ...]``."""
    from peftkit.memory import add_estimate_arguments

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
    import json

    from peftkit.memory import estimate_from_args, format_estimate

    try:
        result = estimate_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_estimate(result))
    return 0


COMMANDS: list[Callable[[Any], None]] = [
    register_train,
    register_eval,
    register_generate,
    register_merge,
    register_inspect,
    register_estimate,
    register_compare,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``peftkit`` parser with every subcommand in :data:`COMMANDS`."""
    from peftkit import __version__

    parser = _Parser(
        prog="peftkit",
        description="Parameter-efficient fine-tuning: train, evaluate, use, merge; estimate memory.",
    )
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peftkit`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with _quiet_libraries():
        return _main(argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is None:
        parser.parse_args(argv)  # --help and --version exit here
        parser.print_help()
        return EXIT_USAGE if argv else 0
    try:
        subparser = _subparsers(parser).choices.get(command)
        if subparser is not None and subparser.get_default("own_flags"):
            # train and inspect parse their flags themselves: method options are not known in advance
            args = subparser.parse_args([])
            return args.handler(args, argv[argv.index(command) + 1 :])
        args = parser.parse_args(argv)
        return args.handler(args, argv)
    except UsageError as e:
        print(f"peftkit {command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"peftkit {command}: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """No weight-loading bars or library warnings while a command runs: peftkit reports itself."""
    import datasets
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    data_verbosity, data_bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        datasets.logging.set_verbosity(data_verbosity)
        if bars:
            logging.enable_progress_bar()
        if data_bars:
            datasets.enable_progress_bars()


def _subparsers(parser: argparse.ArgumentParser) -> Any:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


if __name__ == "__main__":
    sys.exit(main())
