"""Per-token cost of long against short answers through ``peftkit serve``: whether a token late in a long
answer costs what an early one does (issue 22's target: 512 tokens within 10% of 32 per token; each
decoding step once decoded the whole answer again).

    cd benchmarks && python serve_lengths.py --requests 8 --long 512 --short 32

Starts ``peftkit serve`` on SmolLM2-135M-Instruct with ``--adapters`` LoRA adapters (as ``serve_load.py``)
and sends streamed greedy chat requests that ask for long texts, one at a time, short and long
interleaved in rounds after a warm-up. A request's decoding cost per token is (latency − time to first
token) / (tokens − 1): the prompt's prefill is left out, so both lengths are compared on decoding steps
alone. An answer that ends early (the model's end token) counts with the tokens it has. Prints the
medians and long / short.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import httpx
import torch
from common import machine, table
from serve_load import make_adapters, one_request, start_server

from peftkit.models import DEFAULT_MODEL

LONG_QUESTIONS = [
    "Write a long story about a dragon who learns to bake bread. Use at least 600 words.",
    "Describe, in great detail and at length, a walk through a busy city market at dawn.",
    "Write a long letter to a friend about everything you did last summer, day by day.",
    "Explain at length, step by step, how a steam engine works and how it was invented.",
]


async def measure(url: str, models: list[str], count: int, max_tokens: int) -> list[tuple[float, int]]:
    """``count`` requests one at a time, models round-robin: (ms per decoding step, tokens) each."""
    results = []
    async with httpx.AsyncClient(base_url=url, timeout=900) as http:
        for index in range(count):
            question = LONG_QUESTIONS[index % len(LONG_QUESTIONS)]
            latency, first, tokens = await one_request(
                http, models[index % len(models)], question, max_tokens
            )
            if tokens > 1:
                results.append((1000 * (latency - first) / (tokens - 1), tokens))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8, help="counted requests per length")
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--short", type=int, default=32)
    parser.add_argument("--long", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="server's torch threads")
    args = parser.parse_args()

    lengths = {"short": args.short, "long": args.long}
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in lengths}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(DEFAULT_MODEL, Path(tmp), args.adapters, args.rank, tiny=False)
        process, url = start_server(DEFAULT_MODEL, adapters, 1, args.threads)
        models = [path.name for path in adapters] + [DEFAULT_MODEL]
        try:
            asyncio.run(measure(url, models, 2, args.short))  # warm-up
            for index in range(args.rounds):
                order = list(lengths) if index % 2 == 0 else list(lengths)[::-1]
                for name in order:
                    count = args.requests // args.rounds
                    results[name] += asyncio.run(measure(url, models, count, lengths[name]))
                print(f"  round {index + 1}/{args.rounds}", flush=True)
        finally:
            process.terminate()
            process.wait(30)

    print(f"\nmachine: {machine()}")
    print(f"SmolLM2-135M-Instruct, {args.adapters} LoRA r{args.rank} adapters and the base round-robin")
    medians = {name: statistics.median(ms for ms, _ in rows) for name, rows in results.items()}
    rows = []
    for name, answers in results.items():
        tokens = statistics.median(t for _, t in answers)
        rows.append([name, str(lengths[name]), str(len(answers)), f"{tokens:.0f}", f"{medians[name]:.1f}"])
    print(table(["answers", "max_tokens", "done", "tokens/answer (median)", "ms per decoding step"], rows))
    print(f"\nlong / short per token: {medians['long'] / medians['short']:.3f}x")


if __name__ == "__main__":
    main()
