"""peftkit.foundation.cpu_load: other programs' busy cores from /proc/stat, less this run's own CPU time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from peftkit.foundation import cpu_load
from peftkit.foundation.cpu_load import CpuReading, OtherLoad

# user nice system idle iowait irq softirq steal guest guest_nice, in ticks
STAT = """cpu  500 40 60 2000 100 2 4 6 0 0
cpu0 100 20 30 999 50 1 2 3 0 0
cpu1 400 20 30 1001 50 1 2 3 0 0
intr 123 0 0
ctxt 456
"""


@pytest.mark.parametrize(
    ("cores", "others", "processes", "expected"),
    [
        (8, 0.0, 1, 8),  # an idle machine: every core
        (8, 3.0, 1, 5),  # three cores busy elsewhere
        (8, 2.6, 1, 5),  # rounded to the nearest core
        (8, 3.0, 2, 2),  # shared between two processes (5 // 2)
        (2, 20.0, 1, 1),  # never fewer than one
    ],
)
def test_threads_left(cores, others, processes, expected) -> None:
    assert cpu_load.threads_left(cores, others, processes) == expected


def test_busy_seconds_adds_the_busy_states_of_the_cores_asked() -> None:
    # cpu0 busy: user 100 + nice 20 + system 30 + irq 1 + softirq 2 + steal 3 = 156 ticks (idle, iowait out)
    assert cpu_load.busy_seconds(STAT, [0], 100.0) == pytest.approx(1.56)
    assert cpu_load.busy_seconds(STAT, [0, 1], 100.0) == pytest.approx((156 + 456) / 100)
    assert cpu_load.busy_seconds(STAT, [0, 2], 100.0) is None  # no cpu2 line: cannot tell


def _readings(monkeypatch, *readings: CpuReading) -> None:
    queue = list(readings)
    monkeypatch.setattr(cpu_load, "read_cpu", lambda cores: queue.pop(0))
    monkeypatch.setattr(cpu_load.time, "monotonic", lambda: 1e9)  # the window has passed: no pause


def test_busy_cores_leaves_out_this_process_own_time(monkeypatch) -> None:
    # 2 s: the cores were busy 3 CPU-seconds, 1 of them this process's: others kept 1 core busy
    _readings(monkeypatch, CpuReading(100.0, 10.0, 0.0), CpuReading(103.0, 11.0, 2.0))
    assert OtherLoad().busy_cores() == pytest.approx(1.0)


def test_busy_cores_leaves_out_the_run_other_processes(monkeypatch) -> None:
    # two ranks, each using what this one used (1 CPU-second): others kept 0.5 of a core busy
    _readings(monkeypatch, CpuReading(100.0, 10.0, 0.0), CpuReading(103.0, 11.0, 2.0))
    assert OtherLoad(processes=2).busy_cores() == pytest.approx(0.5)


def test_busy_cores_measures_from_the_last_look(monkeypatch) -> None:
    _readings(
        monkeypatch,
        CpuReading(100.0, 0.0, 0.0),
        CpuReading(102.0, 0.0, 1.0),  # 2 cores busy in the first second
        CpuReading(102.0, 0.0, 3.0),  # none in the next two
    )
    load = OtherLoad()
    assert load.busy_cores() == pytest.approx(2.0)
    assert load.busy_cores() == pytest.approx(0.0)


def test_without_proc_stat_the_load_average_stands_in(monkeypatch) -> None:
    _readings(monkeypatch, CpuReading(None, 0.0, 0.0), CpuReading(None, 0.0, 1.0))
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 0.0, 0.0), raising=False)
    assert OtherLoad(processes=2).busy_cores(running=1) == pytest.approx(1.0)  # 3 less this run's 2


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat")
def test_a_busy_program_is_counted() -> None:
    """A child spinning on one core shows as (most of) a busy core; the pause here is this process's."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        load = OtherLoad()
        load.busy_cores()  # from the child's start (its import time) to now
        cpu_load.time.sleep(0.5)
        assert load.busy_cores() >= 0.5
    finally:
        spinner.kill()
        spinner.wait()


def test_chosen_threads_a_fixed_count_then_omp_then_the_free_cores(monkeypatch) -> None:
    monkeypatch.setattr(cpu_load, "free_threads", lambda processes=1: 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cpu_load.chosen_threads(2) == 2  # --threads wins
    assert cpu_load.chosen_threads(0) is None  # OMP_NUM_THREADS: PyTorch's own count stands
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_load.chosen_threads(0) == 3  # a fresh look
    _readings(monkeypatch, CpuReading(100.0, 0.0, 0.0), CpuReading(101.0, 0.0, 1.0))
    assert cpu_load.chosen_threads(0, OtherLoad()) == max(1, len(cpu_load.usable_cores()) - 1)  # 1 core busy
