"""Adapter arithmetic measured: two adapters trained on two tasks, alone and combined, scored on both.

Each of the two ``peftkit train`` runs brings its own held-out rows and prompt settings (its
``train_config.yaml``); every variant (the base model, each adapter alone, each combination) is scored
on both tasks exactly as ``peftkit train`` scores a run: loss on all held-out rows, exact match of
greedy answers on the first ``--examples``. The combinations are built with
``PeftModel.add_weighted_adapter`` in the same process, and their fit errors printed beside the scores.

Usage (the two runs: see docs/adapter-arithmetic.md)::

    python benchmarks/adapter_arithmetic.py out/arith/person out/arith/dates --examples 50
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from common import machine

import peftkit
from peftkit.training.data import prepare_data
from peftkit.training.evaluation import evaluate
from peftkit.training.run_directory import load_base_model
from peftkit.training.runs import run_config

# (label, add_weighted_adapter arguments); None: an input adapter alone or the base model
COMBINATIONS: list[tuple[str, dict[str, Any]]] = [
    ("linear 0.5/0.5", {"weights": [0.5, 0.5], "combination_type": "linear"}),
    ("linear 1/1 (task arithmetic sum)", {"weights": [1.0, 1.0], "combination_type": "linear"}),
    ("ties 1/1, density 0.5", {"weights": [1.0, 1.0], "combination_type": "ties", "density": 0.5}),
    (
        "ties 1/1, density 0.5, rank 16",
        {"weights": [1.0, 1.0], "combination_type": "ties", "density": 0.5, "svd_rank": 16},
    ),
    (
        "dare_ties 1/1, density 0.5",
        {"weights": [1.0, 1.0], "combination_type": "dare_ties", "density": 0.5, "seed": 0},
    ),
    ("svd 1/1, rank 2", {"weights": [1.0, 1.0], "combination_type": "svd", "svd_rank": 2}),
    ("svd 1/1, rank 4", {"weights": [1.0, 1.0], "combination_type": "svd", "svd_rank": 4}),
    ("svd 1/1, rank 8", {"weights": [1.0, 1.0], "combination_type": "svd", "svd_rank": 8}),
    ("svd 0.5/0.5, rank 8", {"weights": [0.5, 0.5], "combination_type": "svd", "svd_rank": 8}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs=2, help="two peftkit train output directories (same base model)")
    parser.add_argument(
        "--examples", type=int, default=50, help="held-out rows scored by generation, per task"
    )
    parser.add_argument("--only", help="comma-separated labels of combinations to run (default: all)")
    args = parser.parse_args()
    print(machine(), flush=True)
    configs = [run_config(run) for run in args.runs]
    base, tokenizer = load_base_model(configs[0])
    model = peftkit.load(base, args.runs[0], adapter_name="task1")
    model.load_adapter(args.runs[1], adapter_name="task2")
    tasks = [(config.data, prepare_data(config, tokenizer).validation) for config in configs]

    def score(label: str, rank: str, error: str) -> str:
        start = time.perf_counter()
        cells = []
        for _, rows in tasks:
            result = evaluate(model, tokenizer, rows, "causal-lm", examples=args.examples, batch_size=16)
            cells += [f"{result['exact_match']:.2f}", f"{result['loss']:.3f}"]
        line = f"| {label} | {rank} | {error} | " + " | ".join(cells) + " |"
        print(f"{line}  ({time.perf_counter() - start:.0f} s)", flush=True)
        return line

    names = [name for name, _ in tasks]
    header = (
        f"| variant | rank | fit error | {names[0]} EM | {names[0]} loss | {names[1]} EM | {names[1]} loss |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    print(header, flush=True)
    with model.disable_adapters():
        lines.append(score("base model", "", ""))
    for name, run in (("task1", args.runs[0]), ("task2", args.runs[1])):
        model.set_adapter(name)
        lines.append(score(f"{run} alone", str(model.peft_config[name].r), ""))
    chosen = set(args.only.split(",")) if args.only else None
    for index, (label, options) in enumerate(COMBINATIONS):
        if chosen is not None and label not in chosen:
            continue
        name = f"combined_{index}"
        start = time.perf_counter()
        report = model.add_weighted_adapter(["task1", "task2"], adapter_name=name, **options)
        built = time.perf_counter() - start
        ranks = sorted(set(report.ranks.values()))
        model.set_adapter(name)
        lines.append(
            score(f"{label} (built in {built:.1f} s)", "/".join(map(str, ranks)), f"{report.total_error:.3f}")
        )
        model.set_adapter("task1")
        model.delete_adapter(name)
    print("\n".join(["", *lines]))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
