"""Where a run runs: its settings, its processes and CPU threads, fixed once it starts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftkit.foundation.cpu_load import OtherLoad, chosen_threads
from peftkit.training.train_config import TrainConfig

__all__ = ["THREAD_CHECK_EVERY", "RunContext", "set_threads"]

THREAD_CHECK_EVERY = 10  # steps between looks at the machine's load (threads: 0)


@dataclass(frozen=True)
class RunContext:
    """A run's settings and this process's place in it (accelerate: one process, or DDP / FSDP2).

    Attributes:
        config: the resolved settings (the bundled task's and the method's defaults filled in).
        accelerator: ``accelerate.Accelerator`` of the run.
        out: ``config.output_dir``.
        main: whether this is the process that writes files and prints.
        world: the number of processes.
        rank: this process's index.
        sharded: parameters sharded with FSDP2 (``fsdp`` under several processes) instead of DDP.
        start: ``time.perf_counter()`` when the run started (for the wall time).
        load: what other programs keep busy on this machine, measured since the last thread check.
    """

    config: TrainConfig
    accelerator: Any
    out: Path
    main: bool
    world: int
    rank: int
    sharded: bool
    start: float = field(default_factory=time.perf_counter)
    load: OtherLoad = field(default_factory=OtherLoad)

    @classmethod
    def create(cls, config: TrainConfig, accelerator: Any) -> RunContext:
        """The context of ``config`` run by ``accelerator``."""
        world = accelerator.num_processes
        return cls(
            config=config,
            accelerator=accelerator,
            out=Path(config.output_dir),
            main=accelerator.is_main_process,
            world=world,
            rank=accelerator.process_index,
            sharded=config.fsdp and world > 1,
            load=OtherLoad(processes=world),
        )

    @property
    def device(self) -> torch.device:
        """This process's device."""
        return self.accelerator.device

    def say(self, text: str = "") -> None:
        """Print on the main process only."""
        if self.main:
            print(text, flush=True)

    def wait_for_everyone(self) -> None:
        """A barrier across the processes (nothing with one)."""
        self.accelerator.wait_for_everyone()


def set_threads(context: RunContext, running: int = 0) -> None:
    """Fix the CPU thread count: ``threads``, else ``OMP_NUM_THREADS``, else the cores other programs
    leave free (:class:`~peftkit.foundation.cpu_load.OtherLoad`: their busy time since the last check,
    not the lagging load average). On a shared machine this matters: two threads fighting another busy
    process for two cores made a SmolLM2 training step 4-6x slower than one thread (measured), as
    OpenMP threads wait on each other.

    Args:
        running: the threads each of this run's processes uses now (0 before it starts); the loop
            rechecks every :data:`THREAD_CHECK_EVERY` steps when ``threads`` is 0.
    """
    if context.device.type != "cpu":
        return
    wanted = chosen_threads(context.config.threads, context.load, running)
    if wanted is not None and wanted != torch.get_num_threads():
        torch.set_num_threads(wanted)
        if running:
            context.say(f"CPU threads: {wanted} (other programs' load changed)")
