"""How much of SmolLM2's NF4 quantization error LoftQ's rank-r start removes, per layer kind.

    python benchmarks/loftq_error.py                 # r=8 (the default job's rank), all linear layers

SmolLM2-135M loaded in nf4 (double quantization, as ``peftkit train --quantize nf4``), LoRA r=8 on
every linear layer with ``init_lora_weights="loftq"`` (``s·B·A`` = the truncated SVD of ``W − Q``).
Prints, per projection, ‖W − Q‖_F summed over the blocks and what is left, ‖W − Q − s·B·A‖_F, and
the same for the attention projections (the default job's targets) and for all of them.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch
from common import machine

import peftkit
from peftkit.models import DEFAULT_MODEL, load_model

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    base, _ = load_model(DEFAULT_MODEL, quantize="nf4")
    config = peftkit.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear")
    model = peftkit.wrap(base, config)
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


if __name__ == "__main__":
    main()
