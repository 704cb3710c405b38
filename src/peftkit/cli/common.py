"""What the subcommands share: the parser class, exit codes, and ``peftkit train``'s flags.

Every :class:`~peftkit.training.train_config.TrainConfig` key is a flag (``--lr``, ``--target-modules``);
flags the parser does not know are method options (``--r 16``), checked against the chosen method's
config class with the closest known name suggested.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from peftkit.training.train_config import FIELDS, TrainConfig, load_config, parse_value

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "Parser",
    "add_config_flags",
    "add_run_arguments",
    "flag",
    "parse_train_args",
    "split_method_flags",
]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def flag(name: str) -> str:
    """``learning_rate`` → ``--learning-rate``."""
    return "--" + name.replace("_", "-")


def add_config_flags(
    parser: argparse.ArgumentParser, shown_defaults: Mapping[str, Any] | None = None
) -> None:
    """A flag for every :class:`TrainConfig` key (defaults suppressed, so only given flags override).

    Args:
        shown_defaults: defaults a command uses instead of ``peftkit train``'s, for the help
            (``compare``'s ``output_dir``).
    """
    parser.add_argument("config", nargs="?", help="YAML file of settings (flags override it)")
    group = parser.add_argument_group("settings (YAML keys; method options such as --r 16 are accepted too)")
    for name, f in FIELDS.items():
        kind = str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = (shown_defaults or {}).get(name, default)
        text = f"{f.metadata['help']} (default: {default})"
        names = [flag(name)] + ([f"--{name}"] if "_" in name else [])
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
    from peftkit.training.method_choice import method_fields, unknown_name

    rest, extra = split_method_flags(argv, parser)
    args = parser.parse_args(rest)
    given = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    config = load_config(args.config, given)
    if extra:
        options = method_fields(config.method)
        for key in extra:
            if key not in options:
                raise unknown_name(key, config.method, FIELDS, "", spell=flag)
        config = config.replace(method_options=extra)
    return args, config


def add_run_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The RUN positional and ``--model`` that eval, generate and merge share."""
    parser.add_argument("run_dir", metavar="RUN", help=what)
    parser.add_argument("--model", help="base model, if not the one the run records")
