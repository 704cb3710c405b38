"""The two paths of a mixed-adapter LoRA layer (``peftkit.ops.multi_lora``), timed against each other.

    python benchmarks/multi_lora_paths.py --threads 1

At SmolLM2's layer shapes, rank 16, n adapters with the rows spread over them: the masked path
(every adapter applied to every token, others' columns zeroed) against the per-row path (each row's
A and B gathered, ``bmm``), for batches from decoding steps (1 token per row) to prompts. The ratio
per-row / masked above 1 means the masked path is faster; ``multi_lora`` takes the masked path for one
token per row, and otherwise while tokens per row × (adapters − 1) ≤ ``MASKED_PATH_MAX_WASTE``, the
column "waste" here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine, table

from peftkit.ops import multi_lora as multi_lora_module
from peftkit.ops.multi_lora import LoraStacks, RowSlots, multi_lora

SHAPES = {"gate/up (576->1536)": (576, 1536), "q/o (576->576)": (576, 576)}
BATCHES = [(16, 1), (8, 1), (4, 2), (2, 4), (2, 8), (2, 16), (2, 45), (4, 45)]  # (rows, tokens per row)


def median_us(run, repeats: int) -> float:
    for _ in range(20):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def time_paths(x: torch.Tensor, y: torch.Tensor, stacks, slots, repeats: int) -> dict[str, float]:
    """Median microseconds of ``multi_lora`` forced onto each path."""
    times = {}
    default = multi_lora_module.masked_path_applies
    try:
        for path, masked in (("masked", True), ("per-row", False)):
            multi_lora_module.masked_path_applies = lambda tokens, adapters, masked=masked: masked
            times[path] = median_us(lambda: multi_lora(x, y.clone(), stacks, slots, in_place=True), repeats)
    finally:
        multi_lora_module.masked_path_applies = default
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for label, (d_in, d_out) in SHAPES.items():
        for n in (2, 4, 8, 16):
            factors = [
                (torch.randn(16, d_in, generator=generator), torch.randn(d_out, 16, generator=generator), 0.5)
                for _ in range(n)
            ]
            for batch, tokens in BATCHES:
                stacks, slots = LoraStacks.from_factors(factors), RowSlots([b % n + 1 for b in range(batch)])
                x = torch.randn(batch, tokens, d_in, generator=generator)
                y = torch.randn(batch, tokens, d_out, generator=generator)
                used = min(batch, n)  # adapters the rows use
                times = time_paths(x, y, stacks, slots, args.repeats)
                rows.append(
                    [
                        label,
                        str(n),
                        f"{batch} x {tokens}",
                        str(tokens * (used - 1)),
                        f"{times['masked']:.0f} us",
                        f"{times['per-row']:.0f} us",
                        f"{times['per-row'] / times['masked']:.2f}",
                    ]
                )
    headers = ["layer", "adapters", "rows x tokens", "waste", "masked", "per-row", "per-row / masked"]
    print(table(headers, rows))
    print(machine())


if __name__ == "__main__":
    main()
