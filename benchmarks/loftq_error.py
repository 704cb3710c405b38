"""How much of SmolLM2's NF4 quantization error LoftQ's rank-r start removes, per layer kind.

    python benchmarks/loftq_error.py                 # r=8 (the default job's rank), all linear layers

SmolLM2-135M loaded in nf4 (double quantization, as ``peftkit train --quantize nf4``), LoRA r=8 on
every linear layer with ``init_lora_weights="loftq"`` (``s·B·A`` = the truncated SVD of ``W − Q``).
Prints, per projection, ‖W − Q‖_F summed over the blocks and what is left, ‖W − Q − s·B·A‖_F, and
the same for the attention projections (the default job's targets) and for all of them. Then how far
the wrapped models' next-token distributions are from the float32 model's on the first 256 tokens of
the shipped English paragraph: mean KL(float ‖ model) per token and top-1 agreement, for LoRA's default
start (the NF4 model itself) and LoftQ on the attention projections and on all linear layers.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch
from common import machine

import peftkit
from peftkit.compare.plan import GENERAL_TEXT
from peftkit.models import DEFAULT_MODEL, load_model

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    model = wrapped(args.r, "all-linear", init=True)
    report = peftkit.replace_lora_weights_loftq(model)
    squares: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # kind -> [Σ‖W−Q‖², Σ‖left‖²]
    for name, (before, after) in report.items():
        kind = name.rsplit(".", 1)[-1]
        for group in (kind, "attention" if kind in ATTENTION else "mlp", "all"):
            squares[group][0] += before**2
            squares[group][1] += after**2
    print(f"\nLoftQ r={args.r} on SmolLM2-135M nf4 ({len(report)} layers)")
    print("| layers | ‖W − Q‖ | ‖W − Q − s·B·A‖ | left |")
    print("|---|---|---|---|")
    mlp = sorted({kind for kind in squares if kind not in (*ATTENTION, "attention", "mlp", "all")})
    for group in (*ATTENTION, "attention", *mlp, "mlp", "all"):
        before, after = (math.sqrt(value) for value in squares[group])
        print(f"| {group} | {before:.2f} | {after:.2f} | {after / before:.3f} |")

    exact, tokenizer = load_model(DEFAULT_MODEL)
    probe = tokenizer(GENERAL_TEXT.read_text(), return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        reference = exact(input_ids=probe).logits.float().log_softmax(-1)  # (1, 256, vocab)
    print("\n| start (nf4 base) | KL(float ‖ model) per token | top-1 = float's |")
    print("|---|---|---|")
    for label, targets, init in [
        ("default (B = 0)", list(ATTENTION), True),
        ("LoftQ, attention", list(ATTENTION), "loftq"),
        ("LoftQ, all-linear", "all-linear", "loftq"),
    ]:
        with torch.no_grad():
            logits = wrapped(args.r, targets, init).eval()(input_ids=probe).logits.float().log_softmax(-1)
        kl = (reference.exp() * (reference - logits)).sum(-1).mean().item()
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"| {label} | {kl:.4f} | {agree:.3f} |")


def wrapped(r: int, targets: str | list[str], init: bool | str) -> peftkit.PeftModel:
    """SmolLM2 loaded in nf4 with LoRA r (alpha 2r, the default job's scaling) on ``targets``."""
    base, _ = load_model(DEFAULT_MODEL, quantize="nf4")
    config = peftkit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=init)
    return peftkit.wrap(base, config)


if __name__ == "__main__":
    main()
