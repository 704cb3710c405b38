"""``peftkit compare [CONFIG.yaml] [--methods …] [--ranks …] [--dry-run] [--key value …]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = ["register_compare", "run_compare_command"]


def register_compare(subparsers: Any) -> None:
    """Add the ``compare`` subcommand."""
    from peftkit.cli.common import add_config_flags
    from peftkit.compare.plan import DEFAULT_METHODS, DEFAULT_OUTPUT, PRESETS

    parser = subparsers.add_parser(
        "compare",
        help="train several methods on the same model, data and budget, and report them side by side",
        description="Run full fine-tuning, selective, LoRA (several ranks), DoRA, IA3, bottleneck adapters "
        "and soft prompts on the same model, data, step budget and seed, and write report.md, report.json "
        "and charts: trainable parameters, file sizes, estimated and measured memory, time per step, the "
        "task metric before and after, and forgetting (loss change on a general text). Rerunning skips "
        "finished methods. CONFIG.yaml holds peftkit train keys plus methods, ranks, rank_sweep and "
        f"general_text. Presets: {', '.join(PRESETS)}, last-N-layers. Default methods: "
        f"{', '.join(DEFAULT_METHODS)}.",
    )
    add_config_flags(parser, shown_defaults={"output_dir": DEFAULT_OUTPUT})
    parser.add_argument("--methods", help="comma-separated presets, overriding the file's methods list")
    parser.add_argument("--ranks", help="LoRA rank sweep, e.g. 1,2,4,8,16,32,64")
    parser.add_argument("--general-text", help="text file for the forgetting probe (default: shipped)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan with rough time and memory")
    parser.set_defaults(handler=run_compare_command, parser=parser, own_flags=True)


def run_compare_command(args: argparse.Namespace, argv: Sequence[str]) -> int:
    parsed = args.parser.parse_args(list(argv))  # --help ends here, before torch loads
    from peftkit.compare.dry_run import check_plan, dry_run_table, planned_costs
    from peftkit.compare.plan import load_plan
    from peftkit.compare.report import REPORT_MD
    from peftkit.compare.runner import run_compare
    from peftkit.foundation.io import check_overwrite, remove_path
    from peftkit.foundation.loading import load_tokenizer
    from peftkit.training.train_config import FIELDS

    overrides = {name: getattr(parsed, name) for name in FIELDS if hasattr(parsed, name)}
    for key in ("methods", "ranks", "general_text"):
        if getattr(parsed, key) is not None:
            overrides[key] = getattr(parsed, key)
    start_over = overrides.pop("overwrite", False)
    if overrides.pop("resume", False):
        print("peftkit compare: reruns always continue (finished methods are skipped); --resume is implied")
    plan = load_plan(parsed.config, overrides)
    counts = check_plan(plan)
    if parsed.dry_run:
        print(dry_run_table(plan, planned_costs(plan, counts, load_tokenizer(plan.shared.model))))
        return 0
    if start_over and plan.output_dir.exists():
        check_overwrite(plan.output_dir, True, "output_dir")
        remove_path(plan.output_dir)
    run_compare(plan)
    print(f"\nreport: {plan.output_dir / REPORT_MD}")
    return 0
