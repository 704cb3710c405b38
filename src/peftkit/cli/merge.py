"""``peftkit merge RUN OUT``: fold the adapter into the base model and save a plain transformers model."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftkit.cli.common import add_run_arguments
from peftkit.errors import UsageError

__all__ = ["register_merge", "run_merge"]


def register_merge(subparsers: Any) -> None:
    """``peftkit merge RUN OUT``."""
    parser = subparsers.add_parser(
        "merge",
        help="fold a trained adapter into its base model and save a plain transformers model",
        description="Merge the adapter into the base weights and save_pretrained the result (with the "
        "tokenizer): transformers loads it with from_pretrained, no peftkit needed. The run's "
        "train_config.yaml goes along, so peftkit generate/eval OUT prompt and score as the run did.",
    )
    add_run_arguments(parser, "output_dir of peftkit train, or an adapter directory")
    parser.add_argument("out", help="directory for the merged model")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty OUT")
    parser.set_defaults(handler=run_merge)


def run_merge(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from peftkit.io import atomic_write, check_overwrite, remove_path, save_pretrained
    from peftkit.model import PeftModel
    from peftkit.training.loop import CONFIG_FILE
    from peftkit.training.runs import is_recorded, load_run

    out = Path(args.out)
    check_overwrite(out, args.overwrite, "OUT")
    model, tokenizer, _ = load_run(args.run_dir, args.model)
    if not isinstance(model, PeftModel):
        raise UsageError(f"{args.run_dir} holds no adapter to merge (a full fine-tuning run is a model)")
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except (ValueError, NotImplementedError) as e:
        raise UsageError(f"cannot merge {args.run_dir}: {e}") from e
    if out.exists():
        remove_path(out)
    save_pretrained([merged, tokenizer], out)
    print(f"merged model written to {out}; load it with transformers' from_pretrained({str(out)!r})")
    if is_recorded(args.run_dir):
        # The run's prompt settings (prompt_template, system_prompt) and data stay with its weights.
        header = f"# peftkit merge: the settings of {args.run_dir}, whose adapter is merged into this model\n"
        recorded = (Path(args.run_dir) / CONFIG_FILE).read_text()
        atomic_write(out / CONFIG_FILE, lambda tmp: tmp.write_text(header + recorded))
        print(f"  with the run's {CONFIG_FILE}: peftkit generate {out} ... prompts as the run did")
    return 0
