"""peftkit.training.loop.context: the run's CPU threads follow what other programs keep busy."""

from __future__ import annotations

import types

import torch

from peftkit.training.loop import context


class _Load:
    """An OtherLoad stand-in: reports ``others`` busy cores and records the running threads asked with."""

    def __init__(self, threads: int) -> None:
        self.wanted = threads
        self.asked: list[int] = []

    def threads(self, running: int = 0) -> int:
        self.asked.append(running)
        return self.wanted


def _context(load: _Load, threads: int = 0) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        device=torch.device("cpu"),
        config=types.SimpleNamespace(threads=threads),
        load=load,
        say=lambda text: None,
    )


def test_set_threads_takes_what_the_load_leaves(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        load = _Load(1)
        context.set_threads(_context(load))
        assert torch.get_num_threads() == 1 and load.asked == [0]
        load.wanted = 2
        context.set_threads(_context(load), running=1)
        assert torch.get_num_threads() == 2 and load.asked == [0, 1]
    finally:
        torch.set_num_threads(before)


def test_set_threads_keeps_a_fixed_number(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        load = _Load(1)
        context.set_threads(_context(load, threads=2))
        assert torch.get_num_threads() == 2 and load.asked == []  # --threads 2: the load is not read
    finally:
        torch.set_num_threads(before)
