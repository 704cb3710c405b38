"""The ``peftkit`` command: train, eval, generate, merge, combine, inspect, estimate, compare, serve, export.

One module per subcommand (``peftkit.cli.<name>``), each with a ``register_<name>(subparsers)`` function
that adds its parser and sets ``handler=<function(args, argv) -> exit code>``; :data:`COMMANDS` lists
them. To add a subcommand, write its module and append its register function to :data:`COMMANDS`.
Shared flags and the parser class live in :mod:`peftkit.cli.common`. Heavy imports (torch models,
datasets) happen inside the handlers, when a command runs.

Bad input (a ``UsageError``) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging as std_logging
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import version
from typing import Any

from peftkit.cli.combine import register_combine
from peftkit.cli.common import EXIT_INTERRUPTED, EXIT_USAGE, Parser, parse_train_args
from peftkit.cli.compare import register_compare
from peftkit.cli.estimate import register_estimate
from peftkit.cli.evaluate import register_eval
from peftkit.cli.export import register_export
from peftkit.cli.generate import register_generate
from peftkit.cli.inspect import register_inspect
from peftkit.cli.merge import register_merge
from peftkit.cli.serve import register_serve
from peftkit.cli.train import register_train
from peftkit.foundation.errors import UsageError, closest

__all__ = ["COMMANDS", "EXIT_INTERRUPTED", "EXIT_USAGE", "build_parser", "main", "parse_train_args"]

_BNB_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"

COMMANDS: list[Callable[[Any], None]] = [
    register_train,
    register_eval,
    register_generate,
    register_merge,
    register_combine,
    register_inspect,
    register_estimate,
    register_compare,
    register_serve,
    register_export,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``peftkit`` parser with every subcommand in :data:`COMMANDS`."""
    parser = Parser(
        prog="peftkit",
        description="Parameter-efficient fine-tuning: train, evaluate, use, merge, combine; estimate memory.",
    )
    parser.add_argument("--version", action="version", version=f"peftkit {version('peftkit')}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peftkit`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    return _main(list(sys.argv[1:] if argv is None else argv))


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
            own = argv[argv.index(command) + 1 :]
            with _quiet_libraries(active=not {"-h", "--help"} & set(own)):
                return args.handler(args, own)
        args, unknown = parser.parse_known_args(argv)
        if unknown and subparser is not None:
            raise _unknown_argument(unknown[0], subparser, command)
        if unknown:
            parser.parse_args(argv)  # argparse's own one-line error
        with _quiet_libraries():
            return args.handler(args, argv)
    except UsageError as e:
        print(f"peftkit {command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"peftkit {command}: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED


@contextlib.contextmanager
def _quiet_libraries(active: bool = True) -> Iterator[None]:
    """No weight-loading bars or library warnings while a command runs: peftkit reports itself.

    Entered when a command runs, not for ``--help``, which answers before transformers is imported.
    """
    if not active:
        yield
        return
    import datasets
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    data_verbosity, data_bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    # bitsandbytes (CPUs with AVX512-BF16) warns on import that it cannot fetch a hub kernel for its
    # repacked 4-bit inference layout; peftkit keeps the standard layout (keep_trainable_layout), so
    # that kernel would not run anyway.
    kernel_log = std_logging.getLogger(_BNB_CPU_KERNEL_LOGGER)
    kernel_level = kernel_log.level
    kernel_log.setLevel(std_logging.ERROR)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        kernel_log.setLevel(kernel_level)
        logging.set_verbosity(verbosity)
        datasets.logging.set_verbosity(data_verbosity)
        if bars:
            logging.enable_progress_bar()
        if data_bars:
            datasets.enable_progress_bars()


def _unknown_argument(argument: str, subparser: argparse.ArgumentParser, command: str) -> UsageError:
    """The subcommand's own flags are the vocabulary for a misspelt one (not the top-level help)."""
    flags = [option for action in subparser._actions for option in action.option_strings]
    name = argument.split("=", 1)[0]
    what = "unknown flag" if name.startswith("-") else "unexpected argument"
    return UsageError(f"{what} {name}{closest(name, flags)}; see peftkit {command} --help")


def _subparsers(parser: argparse.ArgumentParser) -> Any:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


if __name__ == "__main__":
    sys.exit(main())
