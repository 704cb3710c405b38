"""Shared by the benchmarks: interleaved timing, medians, machine facts, tables.

Every benchmark runs all its variants in one process, round-robin (the order rotates each round so
none always follows the same neighbour), after warm-up rounds, and reports medians and ratios.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

#: LoRA's "all-linear" on SmolLM2 (and Llama-like models), spelt out as the benchmarks target it.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Variant:
    """One thing to time: ``run()`` does one repetition (a training step, a forward, a generate)."""

    name: str
    run: Callable[[], object]
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds, all threads

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)


def interleaved(variants: Sequence[Variant], rounds: int, warmup: int = 1, verbose: bool = True) -> None:
    """Run every variant ``warmup + rounds`` times, round-robin; keep the timed rounds' seconds."""
    for index in range(warmup + rounds):
        shift = index % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            start, cpu_start = time.perf_counter(), time.process_time()
            variant.run()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if index >= warmup:
                variant.times.append(elapsed)
                variant.cpu_times.append(cpu)
        if verbose:
            print(
                f"  round {index + 1}/{warmup + rounds}" + (" (warm-up)" if index < warmup else ""),
                flush=True,
            )


def machine() -> str:
    """One line: CPU count, torch threads, load, torch version."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    wait_policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (
        f"{platform.processor() or platform.machine()}, nproc={os.cpu_count()}, "
        f"torch threads={torch.get_num_threads()}, OMP_WAIT_POLICY={wait_policy}, "
        f"load average now={load[0]:.2f}, torch {torch.__version__}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def shared_weights_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers (no weight memory).

    Only for variants that keep the base weights frozen: they never write them.
    """
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def adamw_stepper(
    model: nn.Module, batch: dict, loss: Callable[[nn.Module, dict], torch.Tensor]
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """A training step of ``model`` on ``batch`` (``loss(model, batch)`` backward, AdamW at learning rate 0:
    the whole arithmetic of a step, the weights unchanged) and its optimizer."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(model, batch).backward()
        optimizer.step()

    return step, optimizer


def load_smollm2(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The bundled SmolLM2-135M-Instruct (``peftkit.models.load_model``), in eval mode."""
    from peftkit.models import load_model

    model, _ = load_model(dtype=dtype)
    return model.eval()


def random_tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
