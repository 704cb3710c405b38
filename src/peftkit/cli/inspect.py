"""``peftkit inspect [CONFIG.yaml] [--model M] [--method ...]``: modules, targets, trainable parameters;
``peftkit inspect ADAPTER_DIR``: an adapter's settings and whether vLLM would serve it."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftkit.cli.common import add_config_flags, parse_train_args
from peftkit.foundation.errors import UsageError

__all__ = ["register_inspect", "run_inspect"]


def register_inspect(subparsers: Any) -> None:
    """``peftkit inspect [CONFIG.yaml] [--model M] [--method ...]``."""
    parser = subparsers.add_parser(
        "inspect",
        help="list a model's modules, what a method config targets, and the trainable parameters",
        description="Print the model's modules (type, weight shape, parameters), the modules the method "
        "config would adapt, and the trainable-parameter table. Takes the same settings as train. "
        "Given an adapter directory instead (peftkit inspect ADAPTER_DIR): its settings, and whether vLLM "
        "would serve it (and if not, why).",
    )
    add_config_flags(parser)
    parser.add_argument("--filter", default=None, help="only list modules whose name matches this regex")
    parser.add_argument("--no-modules", dest="modules", action="store_false", help="skip the module list")
    parser.set_defaults(handler=run_inspect, parser=parser, own_flags=True)


def run_inspect(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if len(argv) == 1 and (Path(argv[0]) / "adapter_config.json").is_file():
        from peftkit.export.vllm import adapter_report
        from peftkit.foundation.io import read_adapter

        try:
            read_adapter(Path(argv[0]))  # the reader every command uses: a damaged file is reported here
            print(adapter_report(Path(argv[0])))
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(str(e)) from e
        return 0
    parsed, config = parse_train_args(args.parser, argv)  # --help ends here, before torch loads
    from peftkit.training.inspection import inspect_model

    print(inspect_model(config, parsed.filter, parsed.modules))
    return 0
