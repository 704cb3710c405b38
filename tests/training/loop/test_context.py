"""peftkit.training.loop.context: CPU threads from the load other programs put on the machine."""

from __future__ import annotations

import os

import pytest

from peftkit.training.loop import context


@pytest.mark.parametrize(
    ("load", "running", "processes", "expected"),
    [
        (0.0, 0, 1, 8),  # an idle machine: every core
        (3.0, 0, 1, 5),  # three cores busy elsewhere
        (6.0, 3, 1, 5),  # three of the six busy threads are this run's own
        (3.0, 0, 2, 2),  # shared between two processes (5 // 2)
        (20.0, 0, 1, 1),  # never fewer than one
    ],
)
def test_auto_threads_leaves_other_programs_their_cores(
    monkeypatch, load, running, processes, expected
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert context.auto_threads(running, processes) == expected
