"""Where a mixed-adapter serving load spends its time, against the base model alone: the engine of
``peftkit serve`` in-process (no HTTP), its prefills and decoding steps timed apart.

    python benchmarks/serve_engine.py --requests 64 --clients 8 --adapters 4 --max-tokens 32

Loads SmolLM2-135M-Instruct with ``--adapters`` random LoRA adapters (all-linear, r16, as
``serve_load.py``), then runs two closed loops of ``--clients`` concurrent greedy chat requests, in
interleaved rounds after a warm-up: adapters round-robin ("mixed"), and the base model alone. Each
engine prefill and decoding step is timed; the table shows, per load, the seconds spent in each and
the mean per call, and the ratios mixed / base: the part of the gap each phase accounts for.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import machine, table
from serve_load import QUESTIONS, make_adapters

from peftkit.models import DEFAULT_MODEL
from peftkit.serve.rows import GenerationRequest
from peftkit.serve.sampling import SamplingParams
from peftkit.serve.server import ServeSettings, build_app


class Timed:
    """Wraps an engine method, adding each call's seconds to ``seconds`` and counting calls."""

    def __init__(self, engine: object, name: str) -> None:
        self.seconds, self.calls = 0.0, 0
        original = getattr(engine, name)

        def timed(*args: object) -> object:
            started = time.perf_counter()
            try:
                return original(*args)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        setattr(engine, name, timed)


def run_load(
    engine, prompts: list[list[int]], adapters: list[str | None], requests: int, clients: int, max_tokens: int
) -> tuple[float, int]:
    """``requests`` requests, ``clients`` in flight at a time (a finished one is replaced at once);
    returns (seconds, completion tokens)."""
    done = threading.Semaphore(0)
    tokens = [0]
    submitted = [0]
    lock = threading.Lock()

    def submit() -> None:
        with lock:
            index = submitted[0]
            if index >= requests:
                return
            submitted[0] += 1
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        request = GenerationRequest(
            prompts[index % len(prompts)], adapters[index % len(adapters)], params, on_event
        )
        engine.submit(request)

    def on_event(event) -> None:
        if event.error:
            print(f"a request failed: {event.error}", file=sys.stderr, flush=True)
        if event.final:
            tokens[0] += event.completion_tokens
            done.release()
            submit()

    started = time.perf_counter()
    for _ in range(clients):
        submit()
    for _ in range(requests):
        done.acquire()
    return time.perf_counter() - started, tokens[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="counted requests per load")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(DEFAULT_MODEL, Path(tmp), args.adapters, args.rank, tiny=False)
        settings = ServeSettings(
            adapters={path.name: str(path) for path in paths},
            max_concurrent=args.clients,
            max_queue=1024,
        )
        _, engine = build_app(settings)
        prefill, step = Timed(engine, "_prefill"), Timed(engine, "_step")
        engine.start()
        tokenizer = engine.host.tokenizer
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            )
            for q in QUESTIONS
        ]
        prompts = [list(tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
        loads = {"mixed": [path.name for path in paths], "base": [None]}
        results: dict[str, dict[str, list[float]]] = {name: {} for name in loads}
        run_load(engine, prompts, loads["mixed"], 2 * args.clients, args.clients, args.max_tokens)
        run_load(engine, prompts, loads["base"], 2 * args.clients, args.clients, args.max_tokens)
        for index in range(args.rounds):
            order = list(loads) if index % 2 == 0 else list(loads)[::-1]
            for name in order:
                before = (prefill.seconds, prefill.calls, step.seconds, step.calls)
                seconds, tokens = run_load(
                    engine, prompts, loads[name], args.requests // args.rounds, args.clients, args.max_tokens
                )
                row = results[name]
                row.setdefault("seconds", []).append(seconds)
                row.setdefault("tokens/s", []).append(tokens / seconds)
                row.setdefault("prefill s", []).append(prefill.seconds - before[0])
                row.setdefault("prefill ms/call", []).append(
                    1000 * (prefill.seconds - before[0]) / max(prefill.calls - before[1], 1)
                )
                row.setdefault("step s", []).append(step.seconds - before[2])
                row.setdefault("step ms/call", []).append(
                    1000 * (step.seconds - before[2]) / max(step.calls - before[3], 1)
                )
                row.setdefault("steps", []).append(step.calls - before[3])
            print(f"  round {index + 1}/{args.rounds}", file=sys.stderr, flush=True)
        engine.stop()

    columns = list(results["mixed"])
    medians = {name: {c: statistics.median(v) for c, v in row.items()} for name, row in results.items()}
    rows = [[name, *(f"{medians[name][c]:.3g}" for c in columns)] for name in loads]
    rows.append(["mixed / base", *(f"{medians['mixed'][c] / medians['base'][c]:.2f}" for c in columns)])
    print(machine())
    print(
        f"medians of {args.rounds} interleaved rounds, {args.requests // args.rounds} requests each, "
        f"{args.clients} clients, {args.adapters} adapters, torch threads {torch.get_num_threads()}"
    )
    print(table(["load", *columns], rows))


if __name__ == "__main__":
    main()
