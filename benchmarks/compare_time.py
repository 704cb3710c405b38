"""The shares of the matmul speed that ``peftkit compare --dry-run``'s time model assumes, measured.

In one process, with the thread count a run would use (``compare.runner.threads_of_runs``): the speed of a
1024² float32 matmul (``dry_run.machine_flops``), then on SmolLM2-135M and the bundled person-json task
the held-out loss pass (2·N FLOPs a token), greedy decoding of 32 rows at once (2·N a new token, after the
prompts are read at the loss pass's speed) and ``--steps`` training steps of the default LoRA (4·N a
token); each phase's FLOPs over its time, as a share of the matmul speed, next to the constant the dry run
uses.

Usage::

    python benchmarks/compare_time.py --steps 4
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import machine, table

from peftkit.compare.dry_run import GENERATION_EFFICIENCY, TRAINING_EFFICIENCY, machine_flops
from peftkit.compare.runner import threads_of_runs
from peftkit.training.data import collate, prepare_data
from peftkit.training.evaluation import ANSWER_MARGIN, forward_logits, generate_answers, pad_token_id
from peftkit.training.loop import load_base_model, train
from peftkit.training.train_config import load_config, with_task_defaults

ROWS = 32  # held-out rows scored and decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps timed")
    args = parser.parse_args()
    config = with_task_defaults(load_config(None, {}))
    model, tokenizer = load_base_model(config)
    data = prepare_data(config, tokenizer)
    rows = data.validation.select(range(ROWS))
    n = sum(p.numel() for p in model.parameters())
    pad = pad_token_id(tokenizer)
    with threads_of_runs(config) as threads:
        flops = machine_flops()
        start = time.perf_counter()
        with torch.no_grad():
            for first in range(0, ROWS, 16):
                batch = collate(list(rows.select(range(first, first + 16))), pad)
                forward_logits(model, batch, config.task)
        loss_seconds = time.perf_counter() - start
        loss_share = 2 * n * sum(len(ids) for ids in rows["input_ids"]) / (flops * loss_seconds)
        references = [r[0] for r in rows["references"]]
        new = (
            max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + ANSWER_MARGIN
        )
        start = time.perf_counter()
        generate_answers(model, tokenizer, rows["prompt_ids"], config.task, new)
        reading = 2 * n * sum(len(ids) for ids in rows["prompt_ids"]) / (flops * loss_share)
        decode_share = 2 * n * ROWS * new / (flops * (time.perf_counter() - start - reading))
    with tempfile.TemporaryDirectory() as out:
        settings = {"output_dir": out, "overwrite": True, "max_steps": args.steps, "eval_examples": 0}
        result = train(load_config(None, settings), evaluate_before=False)
    step_tokens = config.batch_size * sum(len(ids) for ids in data.train["input_ids"]) / len(data.train)
    train_share = 4 * n * step_tokens / (flops * result.train_time_s / result.steps)
    print(f"{machine()}; {threads} thread(s); 1024² matmul {flops / 1e9:.1f} GFLOP/s")
    print(
        table(
            ["phase", "measured share", "dry run assumes"],
            [
                [f"training step (x{args.steps})", f"{train_share:.2f}", f"{TRAINING_EFFICIENCY}"],
                [f"held-out loss pass ({ROWS} rows)", f"{loss_share:.2f}", f"{TRAINING_EFFICIENCY}"],
                [
                    f"greedy decoding ({ROWS} rows x {new} tokens)",
                    f"{decode_share:.2f}",
                    f"{GENERATION_EFFICIENCY}",
                ],
            ],
        )
    )


if __name__ == "__main__":
    main()
