"""``peftkit combine OUT ADAPTER... --weights W...``: one LoRA adapter from weighted trained adapters."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.arithmetic.settings import COMBINATION_TYPES, EXACT_TYPES, Combination
from peftkit.foundation.errors import UsageError

if TYPE_CHECKING:
    from peftkit.arithmetic.weighted import CombinationReport
    from peftkit.model import PeftModel

__all__ = ["register_combine", "run_combine"]

RECORD_NAME = "combination.json"  # how the adapter was made, next to it


def register_combine(subparsers: Any) -> None:
    """``peftkit combine OUT ADAPTER... --weights W... [--method M] [--density D] [--rank K]``."""
    parser = subparsers.add_parser(
        "combine",
        help="combine trained LoRA adapters into one (weighted sum, TIES, DARE, SVD compression)",
        description="Write one LoRA adapter whose update is a weighted combination of the adapters' "
        "updates ΔW = s·B·A, module by module. linear and cat are exact (rank = the sum of the ranks; a "
        "negative weight subtracts a task); the other methods end with the best rank-K fit, and the "
        "relative error of that fit is printed per module and in total. The result is a plain LoRA "
        "adapter that peftkit and Hugging Face PEFT load.",
    )
    parser.add_argument("out", metavar="OUT_DIR", help="directory for the combined adapter")
    parser.add_argument(
        "adapters", metavar="ADAPTER_DIR", nargs="+", help="adapter directories or peftkit train runs"
    )
    parser.add_argument(
        "--weights", type=float, nargs="+", required=True, metavar="W", help="one weight per adapter"
    )
    parser.add_argument(
        "--method",
        choices=COMBINATION_TYPES,
        default="linear",
        metavar="METHOD",
        help=f"{', '.join(COMBINATION_TYPES)} (default: linear, exact)",
    )
    parser.add_argument(
        "--density", type=float, help="share of each update's entries kept (ties, dare_*, magnitude_prune)"
    )
    parser.add_argument(
        "--rank", type=int, help="rank of the fit (default: the largest input rank per module)"
    )
    parser.add_argument("--svd-clamp", type=float, help="clip the fitted factors at this quantile")
    parser.add_argument(
        "--majority-sign-method", choices=("total", "frequency"), default="total", help="TIES sign election"
    )
    parser.add_argument("--seed", type=int, default=0, help="DARE's random drop (default: 0)")
    parser.add_argument("--model", help="base model, if not the one the adapters record")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty OUT_DIR")
    parser.set_defaults(handler=run_combine)


def run_combine(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from peftkit.foundation.io import CONFIG_NAME, atomic_directory, check_overwrite

    out = Path(args.out)
    check_overwrite(out, args.overwrite, "OUT_DIR")
    combination = Combination(
        args.weights,
        args.method,
        args.rank,
        args.svd_clamp,
        args.density,
        args.majority_sign_method,
        args.seed,
    )
    try:
        combination.check(len(args.adapters))
    except ValueError as e:
        raise UsageError(_as_flags(str(e))) from e
    directories = [Path(path) for path in args.adapters]
    for directory in directories:
        _check_lora_dir(directory, CONFIG_NAME)
    model, base_model, report = _combine(directories, combination, args)
    record = {
        "adapters": [str(d) for d in directories],
        "weights": args.weights,
        "method": args.method,
        "density": args.density,
        "rank": args.rank,
        "svd_clamp": args.svd_clamp,
        "majority_sign_method": args.majority_sign_method,
        "seed": args.seed,
        "base_model": base_model,
        "ranks": report.ranks,
        "relative_errors": report.errors,
        "total_relative_error": report.total_error,
    }
    with atomic_directory(out, replace=True) as staging:  # a reader never sees half an adapter
        model.save_pretrained(staging, selected_adapters=["default"])
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    print(report.table())
    exact = " (exact)" if args.method in EXACT_TYPES else f" of the {args.method} update"
    print(
        f"combined adapter written to {out}: total relative error {report.total_error:.3e}{exact}; "
        f"ranks {min(report.ranks.values())}–{max(report.ranks.values())}"
    )
    return 0


def _combine(
    directories: list[Path], combination: Combination, args: argparse.Namespace
) -> tuple[PeftModel, str, CombinationReport]:
    """Load the base model the adapters record (or ``--model``) with the adapters as ``input_<i>`` and
    add their combination as ``default``; returns the model, the base model's name and the report."""
    from peftkit.model import load
    from peftkit.training.run_directory import load_base_model
    from peftkit.training.runs import run_config

    configs = [run_config(directory, args.model) for directory in directories]
    bases = sorted({config.model for config in configs})
    if len(bases) > 1:
        raise UsageError(
            f"the adapters record different base models ({', '.join(bases)}); pass --model BASE to combine "
            "them on one"
        )
    base, _ = load_base_model(configs[0])
    names = [f"input_{i}" for i in range(len(directories))]
    try:
        model = load(base, directories[0], adapter_name=names[0])
        for name, directory in zip(names[1:], directories[1:], strict=True):
            model.load_adapter(directory, adapter_name=name)
        report = model.add_weighted_adapter(
            names,
            combination.weights,
            "default",
            combination_type=combination.combination_type,
            svd_rank=combination.svd_rank,
            svd_clamp=combination.svd_clamp,
            density=combination.density,
            majority_sign_method=combination.majority_sign_method,
            seed=combination.seed,
        )
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"cannot combine {' '.join(args.adapters)}: {e}") from e
    return model, configs[0].model, report


def _check_lora_dir(directory: Path, config_name: str) -> None:
    """Refuse a path that is not a LoRA adapter directory before any model loads."""
    config_file = directory / config_name
    if not config_file.is_file():
        raise UsageError(
            f"{directory} holds no {config_name}: pass adapter directories or peftkit train runs"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{config_file} is not valid JSON: {e}") from e
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA" or config.get("use_dora"):
        what = "DoRA" if kind == "LORA" else kind or "non-LoRA"
        raise UsageError(
            f"{directory} is {what}, not LoRA; only LoRA adapters combine (their updates s·B·A add up)"
        )


def _as_flags(message: str) -> str:
    """The Python argument names of a message as the flags that set them."""
    for name, spelled in (
        ("combination_type", "--method"),
        ("svd_rank", "--rank"),
        ("svd_clamp", "--svd-clamp"),
        ("majority_sign_method", "--majority-sign-method"),
        ("density", "--density"),
        ("weights", "--weights"),
    ):
        message = message.replace(f"{name}=", f"{spelled} ")
    return message
