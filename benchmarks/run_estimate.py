"""A run's memory estimate (``peftkit train --estimate-only``) against a measured step of that run.

    python benchmarks/run_estimate.py                          # the default job
    python benchmarks/run_estimate.py ../examples/dialogsum.yaml --data DEV.jsonl --validation-data TEST.jsonl

Reference: ``measure_training_step`` with ``peftkit train``'s loss on the run's ``batch_size`` longest
training rows, padded as ``peftkit train`` pads them (its worst step).
"""

from __future__ import annotations

import argparse
import resource

import torch

from peftkit.memory import measure_training_step
from peftkit.model import wrap
from peftkit.objectives.tokens import loss_sum
from peftkit.training.data import collate, prepare_data
from peftkit.training.estimate import estimate_run
from peftkit.training.evaluation import pad_token_id
from peftkit.training.method_choice import build_method_config
from peftkit.training.run_directory import load_base_model
from peftkit.training.train_config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?")
    parser.add_argument("--data")
    parser.add_argument("--validation-data")
    args = parser.parse_args()
    torch.set_num_threads(2)
    overrides = {k: v for k, v in {"data": args.data, "validation_data": args.validation_data}.items() if v}
    config = load_config(args.config, overrides)
    predicted, _ = estimate_run(config)
    model, tokenizer = load_base_model(config)
    rows = prepare_data(config, tokenizer).train.select_columns(["input_ids", "labels"]).to_list()
    rows.sort(key=lambda row: -len(row["input_ids"]))
    batch = collate(rows[: config.batch_size], pad_token_id(tokenizer))
    model = wrap(model, build_method_config(config.method, config.method_options, config.task))
    measured = measure_training_step(model, batch, loss_fn=lambda m, b: loss_sum(m, b, config.task)[0])
    gib, lora = 2**30, predicted.peft
    print("batch", tuple(batch["input_ids"].shape))
    print(f"estimate peak {lora.peak / gib:.3f} GiB (activations {lora.activations / gib:.3f})")
    print(f"measured peak {measured.peak / gib:.3f} GiB (activations {measured.activations / gib:.3f})")
    print(f"estimate / measured {lora.peak / measured.peak:.3f}")
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f} GiB")


if __name__ == "__main__":
    main()
