"""``peftkit merge RUN OUT``: fold the adapter into the base model and save a plain transformers model."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftkit.cli.common import add_run_arguments
from peftkit.foundation.errors import UsageError
from peftkit.foundation.quantization import SCHEMES

PROBE_TOKENS = 256

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
    parser.add_argument(
        "--requantize",
        nargs="?",
        const=True,
        default=False,
        type=_scheme,
        metavar="SCHEME",
        help="a run trained on a quantized base (--quantize): quantize the merged layers again (as they "
        "were, or with SCHEME: nf4, fp4, int8) instead of saving them dequantized; prints how much the "
        "logits changed against the unmerged model on --probe-text",
    )
    parser.add_argument(
        "--probe-text",
        metavar="FILE",
        help="text to measure the change of the logits on with --requantize (default: a shipped "
        f"paragraph of general English; its first {PROBE_TOKENS} tokens)",
    )
    parser.set_defaults(handler=run_merge)


def run_merge(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from peftkit.foundation.io import atomic_directory, check_overwrite, save_pretrained
    from peftkit.model import PeftModel
    from peftkit.training.run_directory import CONFIG_FILE
    from peftkit.training.runs import is_recorded, load_run

    out = Path(args.out)
    check_overwrite(out, args.overwrite, "OUT")
    model, tokenizer, _ = load_run(args.run_dir, args.model)
    if not isinstance(model, PeftModel):
        raise UsageError(f"{args.run_dir} holds no adapter to merge (a full fine-tuning run is a model)")
    probe = _probe(args.probe_text, tokenizer) if args.requantize else None
    try:
        merged = model.merge_and_unload(safe_merge=True, requantize=args.requantize, probe=probe)
    except (ValueError, NotImplementedError) as e:
        raise UsageError(f"cannot merge {args.run_dir}: {e}") from e
    if args.requantize:
        print(f"re-quantized the merged layers; {merged.requantization_report}")
    recorded = is_recorded(args.run_dir)
    with atomic_directory(out, replace=True) as staging:  # OUT appears complete or not at all
        save_pretrained([merged, tokenizer], staging)
        if recorded:
            # The run's prompt settings (prompt_template, system_prompt) and data stay with its weights.
            header = (
                f"# peftkit merge: the settings of {args.run_dir}, whose adapter is merged into this model\n"
            )
            (staging / CONFIG_FILE).write_text(header + (Path(args.run_dir) / CONFIG_FILE).read_text())
    print(f"merged model written to {out}; load it with transformers' from_pretrained({str(out)!r})")
    if recorded:
        print(f"  with the run's {CONFIG_FILE}: peftkit generate {out} ... prompts as the run did")
    return 0


def _scheme(text: str) -> str:
    if text not in SCHEMES:
        raise argparse.ArgumentTypeError(f"unknown scheme {text!r}; use one of {', '.join(SCHEMES)}")
    return text


def _probe(path: str | None, tokenizer: Any) -> Any:
    """``(1, <=PROBE_TOKENS)`` token ids of the probe text (``None``: random ids, when no tokenizer)."""
    from peftkit.compare.plan import GENERAL_TEXT

    if tokenizer is None:
        return None
    source = Path(path) if path else GENERAL_TEXT
    if not source.is_file():
        raise UsageError(f"--probe-text: no file {source}")
    ids = tokenizer(source.read_text(), return_tensors="pt").input_ids
    return ids[:, :PROBE_TOKENS]
