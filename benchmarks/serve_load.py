"""Load test of ``peftkit serve``: throughput and latency with many adapters, against one request at a
time and against the base model alone, side by side in one run.

    python benchmarks/serve_load.py --requests 200 --clients 8 --adapters 4 --max-tokens 32

Starts ``peftkit serve`` (a subprocess on a free loopback port) with ``--adapters`` LoRA adapters
(all-linear, r16, random weights so they change the output), then runs three scenarios, interleaved
in rounds (the order rotates each round), after warm-up requests that are not counted:

- mixed: ``--clients`` concurrent clients, adapters round-robin over the requests;
- one at a time: a single client, adapters round-robin;
- base only: ``--clients`` concurrent clients, every request on the base model.

Each request is a streamed chat completion (greedy); time to first token is the first content chunk,
latency the ``[DONE]``, tokens the ``usage`` the server reports. A scenario stops at ``--time-cap``
seconds in total; requests left are reported as not run. Prints a Markdown table and the ratios.
``--tiny`` serves a 2-layer random Llama (tests/helpers/tiny_lm.py) instead of SmolLM2, for a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from common import ALL_LINEAR, machine, table

QUESTIONS = [
    "Name three colours of the rainbow.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "Say hello in Spanish.",
    "What is two plus two?",
    "Name a fruit that is yellow.",
]


@dataclass
class Scenario:
    """One load shape and what its requests measured."""

    name: str
    clients: int
    adapters: list[str]  # round-robin over the requests; ["<base>"] for the base model
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    not_run: int = 0


def make_adapters(model: str, out: Path, count: int, rank: int, tiny: bool) -> list[Path]:
    """``count`` LoRA adapters with random A and small random B, saved under ``out``."""
    from peftkit import LoraConfig, wrap
    from peftkit.models import load_model

    paths = []
    targets = ["q_proj", "v_proj", "down_proj"] if tiny else ALL_LINEAR
    for index in range(count):
        base, _ = load_model(model)
        torch.manual_seed(index)
        peft = wrap(
            base, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
        )
        with torch.no_grad():  # small updates: answers change but stay language
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.05)
        peft.save_pretrained(out / f"adapter{index}")
        paths.append(out / f"adapter{index}")
    return paths


def start_server(
    model: str, adapters: list[Path], clients: int, threads: int
) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable,
        "-m",
        "peftkit",
        "serve",
        "--model",
        model,
        "--port",
        "0",
        "--max-concurrent",
        str(clients),
        "--max-queue",
        "1024",
    ]
    for path in adapters:
        command += ["--adapter", f"{path.name}={path}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    while True:
        line = process.stderr.readline()
        if not line:
            raise RuntimeError("peftkit serve ended before it listened")
        found = re.search(r"(http://\S+)/v1", line)
        if found:
            return process, found.group(1)


async def one_request(
    http: httpx.AsyncClient, model: str, question: str, max_tokens: int
) -> tuple[float, float, int]:
    """Latency, time to first token, completion tokens of one streamed chat completion."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    latency = time.perf_counter() - start
    return latency, first if first is not None else latency, tokens


async def run_batch(
    url: str,
    scenario: Scenario,
    count: int,
    offset: int,
    max_tokens: int,
    deadline: float,
    base_name: str,
    record: bool,
) -> None:
    """``count`` requests of ``scenario`` by its clients; record them unless warming up."""
    jobs = list(range(offset, offset + count))
    start = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        while jobs:
            job = jobs.pop(0)
            if time.perf_counter() > deadline:
                scenario.not_run += 1 if record else 0
                continue
            adapter = scenario.adapters[job % len(scenario.adapters)]
            model = base_name if adapter == "<base>" else adapter
            try:
                latency, first, tokens = await one_request(
                    http, model, QUESTIONS[job % len(QUESTIONS)], max_tokens
                )
            except (httpx.HTTPError, RuntimeError) as e:
                if record:
                    scenario.errors.append(str(e))
                continue
            if record:
                scenario.latencies.append(latency)
                scenario.first_tokens.append(first)
                scenario.tokens += tokens

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(scenario.clients)))
    if record:
        scenario.seconds += time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="counted requests per scenario")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--rounds", type=int, default=4, help="interleaved rounds the requests are split into"
    )
    parser.add_argument("--warmup", type=int, default=8, help="uncounted requests per scenario first")
    parser.add_argument("--time-cap", type=float, default=900, help="seconds per scenario, all rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="server's torch threads")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random Llama instead of SmolLM2")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from helpers.tiny_lm import save_tiny_lm

            model = str(save_tiny_lm(Path(tmp) / "tiny"))
        else:
            from peftkit.models import DEFAULT_MODEL

            model = DEFAULT_MODEL
        adapters = make_adapters(model, Path(tmp), args.adapters, args.rank, args.tiny)
        process, url = start_server(model, adapters, args.clients, args.threads)
        names = [path.name for path in adapters]
        scenarios = [
            Scenario(f"{args.clients} clients, {args.adapters} adapters", args.clients, names),
            Scenario(f"1 client, {args.adapters} adapters", 1, names),
            Scenario(f"{args.clients} clients, base only", args.clients, ["<base>"]),
        ]
        try:
            for scenario in scenarios:
                asyncio.run(
                    run_batch(url, scenario, args.warmup, 0, args.max_tokens, float("inf"), model, False)
                )
            per_round = [
                args.requests // args.rounds + (i < args.requests % args.rounds) for i in range(args.rounds)
            ]
            started = {scenario.name: 0.0 for scenario in scenarios}
            for index, count in enumerate(per_round):
                shift = index % len(scenarios)
                for scenario in [*scenarios[shift:], *scenarios[:shift]]:
                    deadline = time.perf_counter() + args.time_cap - started[scenario.name]
                    asyncio.run(
                        run_batch(
                            url,
                            scenario,
                            count,
                            sum(per_round[:index]),
                            args.max_tokens,
                            deadline,
                            model,
                            True,
                        )
                    )
                    started[scenario.name] = scenario.seconds
                print(f"  round {index + 1}/{args.rounds}", flush=True)
        finally:
            process.terminate()
            process.wait(30)

    print(f"\nmachine: {machine()}")
    name = "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct"
    print(
        f"model: {name}, {args.requests} requests per scenario, at most {args.max_tokens} new tokens, "
        f"greedy, LoRA r{args.rank}, server threads {args.threads}\n"
    )
    rows = []
    for s in scenarios:
        throughput = s.tokens / s.seconds if s.seconds else float("nan")
        per_answer = s.tokens / len(s.latencies) if s.latencies else float("nan")
        rows.append(
            [
                s.name,
                str(len(s.latencies)),
                str(len(s.errors)),
                str(s.not_run),
                f"{per_answer:.1f}",
                f"{throughput:.1f}",
                f"{percentile(s.latencies, 0.5):.2f}",
                f"{percentile(s.latencies, 0.99):.2f}",
                f"{percentile(s.first_tokens, 0.5):.2f}",
                f"{percentile(s.first_tokens, 0.99):.2f}",
            ]
        )
    headers = [
        "scenario",
        "done",
        "errors",
        "not run",
        "tokens/answer",
        "tokens/s",
        "p50 s",
        "p99 s",
        "TTFT p50 s",
        "TTFT p99 s",
    ]
    print(table(headers, rows))
    rate = [s.tokens / s.seconds if s.seconds else float("nan") for s in scenarios]
    print(f"\nmixed / one at a time: {rate[0] / rate[1]:.2f}x   mixed / base only: {rate[0] / rate[2]:.2f}x")
    for s in scenarios:
        if s.errors:
            print(f"{s.name}: first error: {s.errors[0]}")


if __name__ == "__main__":
    main()
