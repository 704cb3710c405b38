"""Ctrl-C during a run: finish the current step, save a checkpoint, stop (all processes together)."""

from __future__ import annotations

import signal
import sys
from typing import Any

import torch

from peftkit.training.loop.context import RunContext

__all__ = ["StopFlag", "stop_requested"]


class StopFlag:
    """Within the block, Ctrl-C sets :attr:`requested` (the loop stops after the current step); a
    second Ctrl-C aborts at once. Off the main thread signals are left alone."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again aborts now)",
            file=sys.stderr,
        )

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def stop_requested(context: RunContext, requested: bool) -> bool:
    """Whether any process saw Ctrl-C (all processes must stop at the same step)."""
    if context.world == 1:
        return requested
    flag = torch.tensor([1.0 if requested else 0.0], device=context.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
