"""Run under torchrun by tests/helpers/torchrun.py: train with DDP (or FSDP2), then save each rank's trainable
parameters (DDP only: under FSDP2 a process holds shards).

Usage: ``torchrun --nproc_per_node=2 tests/helpers/ddp_worker.py '<JSON of TrainConfig keys>'``; each
rank writes ``<output_dir>/rank-<rank>.safetensors``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from safetensors.torch import save_file

from peftkit.training.checkpoints import trainable_state
from peftkit.training.loop import train
from peftkit.training.train_config import load_config


def main() -> None:
    config = load_config(None, json.loads(sys.argv[1]))
    ctrl_c_at = int(os.environ.get("PEFTKIT_TEST_CTRL_C_AT", "0"))  # press Ctrl-C after this step

    def press_ctrl_c(step: int, loss: float, model: object) -> None:
        if step == ctrl_c_at:
            signal.raise_signal(signal.SIGINT)

    result = train(config, on_step=press_ctrl_c if ctrl_c_at else None)
    if config.fsdp:  # each process holds shards; the adapter file in output_dir is the whole
        return
    rank = int(os.environ.get("RANK", "0"))
    save_file(trainable_state(result.model), str(Path(config.output_dir) / f"rank-{rank}.safetensors"))


if __name__ == "__main__":
    main()
