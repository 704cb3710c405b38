"""Launch ``helpers/ddp_worker.py`` under torchrun with 2 CPU processes (gloo), for DDP and FSDP2 tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_two_processes(settings: dict[str, Any], timeout: float = 180, ctrl_c_at: int = 0) -> str:
    """Train with ``settings`` (TrainConfig keys) in 2 processes; returns stdout, asserts exit code 0.

    ``ctrl_c_at``: rank 0 presses Ctrl-C after that step (0: never).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    env["PEFTKIT_TEST_CTRL_C_AT"] = str(ctrl_c_at)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "helpers" / "ddp_worker.py"),
        json.dumps(settings),
    ]
    # its own session, so that a hang can be killed whole (torchrun and both workers)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, stderr[-3000:]
    return stdout
