"""How many CPU cores other programs keep busy now, and so how many threads a run should take.

The 1-minute load average lags: a program that stopped a moment ago still counts as ``exp(-t/60)`` of
each core it used, so a run started right after another (a second ``peftkit train``, a benchmark's next
variant) saw two free cores as none and took one thread; rechecking with it every 10 steps gave the
second thread back only after about a minute (benchmarks/real_data.py, packed: 166 real tokens/s
that way, 200 with both threads throughout; docs/benchmarks.md). Here the cores' busy time is read from
``/proc/stat`` over a window (the steps since the last look, or a short pause at the start), less the
CPU time this process itself used, for the cores this process may run on. Where ``/proc/stat`` is
missing (macOS, Windows) the load average stands in.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CpuReading",
    "OtherLoad",
    "busy_seconds",
    "chosen_threads",
    "free_threads",
    "threads_left",
    "usable_cores",
]

PROC_STAT = Path("/proc/stat")
MIN_WINDOW_S = 0.2  # the shortest window measured (/proc/stat counts in 10 ms ticks)
# /proc/stat's per-core columns: user nice system idle iowait irq softirq steal (then guest, counted in user)
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


@dataclass(frozen=True)
class CpuReading:
    """One look at the clocks.

    Attributes:
        busy_s: CPU-seconds the cores this process may use have spent busy since boot (None without
            ``/proc/stat``).
        own_s: CPU-seconds this process has used, all its threads (``time.process_time``).
        at_s: ``time.monotonic()``.
    """

    busy_s: float | None
    own_s: float
    at_s: float


def usable_cores() -> list[int]:
    """The indices of the cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def busy_seconds(stat_text: str, cores: Collection[int], ticks_per_s: float) -> float | None:
    """CPU-seconds ``cores`` have spent busy since boot, from the text of ``/proc/stat``.

    Args:
        stat_text: the file's text; its ``cpuN`` lines count ticks per state.
        cores: which ``cpuN`` lines to add up.
        ticks_per_s: ``os.sysconf("SC_CLK_TCK")``.

    Returns:
        The seconds, or None when a core of ``cores`` has no line.
    """
    wanted = {f"cpu{core}" for core in cores}
    ticks = 0
    for line in stat_text.splitlines():
        name, _, counts = line.partition(" ")
        if name in wanted:
            columns = counts.split()
            ticks += sum(int(columns[i]) for i in _BUSY_COLUMNS if i < len(columns))
            wanted.discard(name)
    return None if wanted else ticks / ticks_per_s


def read_cpu(cores: Collection[int]) -> CpuReading:
    """The clocks now, for ``cores``."""
    busy = None
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no /proc (macOS, Windows), odd layout
        busy = busy_seconds(PROC_STAT.read_text(), cores, os.sysconf("SC_CLK_TCK"))
    return CpuReading(busy_s=busy, own_s=time.process_time(), at_s=time.monotonic())


def threads_left(cores: int, others: float, processes: int = 1) -> int:
    """Threads for each of ``processes``: the cores that ``others`` busy cores leave, at least one."""
    return max(1, round(cores - others) // processes)


class OtherLoad:
    """The cores other programs kept busy since the last look (:meth:`busy_cores`).

    Args:
        processes: this run's processes (DDP / FSDP2 ranks); each is taken to use as much CPU as this
            one, so the others' share of the busy time is what remains.
    """

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes
        self.cores = usable_cores()
        self._last = read_cpu(self.cores)

    def busy_cores(self, running: int = 0) -> float:
        """Cores other programs kept busy on average since the last call (or since this object was made;
        waits until :data:`MIN_WINDOW_S` has passed).

        Args:
            running: the threads each of this run's processes uses now; only the load-average
                stand-in needs it (it cannot tell this run's load from others').
        """
        wait = MIN_WINDOW_S - (time.monotonic() - self._last.at_s)
        if wait > 0:
            time.sleep(wait)
        before, now = self._last, read_cpu(self.cores)
        self._last = now
        if before.busy_s is None or now.busy_s is None:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
            return max(0.0, load - running * self.processes)
        own = (now.own_s - before.own_s) * self.processes
        return max(0.0, now.busy_s - before.busy_s - own) / (now.at_s - before.at_s)

    def threads(self, running: int = 0) -> int:
        """Threads for each process: the cores :meth:`busy_cores` leaves free (see :func:`threads_left`)."""
        return threads_left(len(self.cores), self.busy_cores(running), self.processes)


def free_threads(processes: int = 1) -> int:
    """Threads for each of ``processes`` from a fresh look (a :data:`MIN_WINDOW_S` pause)."""
    return OtherLoad(processes).threads()


def chosen_threads(threads: int, load: OtherLoad | None = None, running: int = 0) -> int | None:
    """The CPU threads a ``train``, ``compare`` or ``serve`` process takes: ``threads`` when set; None when
    ``OMP_NUM_THREADS`` is (PyTorch's count stands); else the cores other programs leave free, from
    ``load`` since its last look (``running`` as in :meth:`OtherLoad.busy_cores`) or a fresh look."""
    if threads:
        return threads
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return load.threads(running) if load is not None else free_threads()
