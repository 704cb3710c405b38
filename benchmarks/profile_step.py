"""Where a LoRA training step's time goes beyond the frozen network's floor: one profiled step each.

    python benchmarks/profile_step.py --batch 4 --seq 256

SmolLM2-135M, LoRA all-linear r16 alpha 32 dropout 0.05 (peftkit) against the floor (the frozen model,
input gradients only), the model's own loss, one warm-up step, then one step under
``torch.profiler``; prints each profile's ops by self CPU time. A breakdown, not a timing to quote:
take step times from ``train_step.py``.
"""

from __future__ import annotations

import argparse

import torch
from common import ALL_LINEAR, load_smollm2, machine, random_tokens, shared_weights_copy

import peftkit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=14, help="ops shown per profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    base = load_smollm2()
    ids = random_tokens(args.batch, args.seq, base.config.vocab_size)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    config = peftkit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=ALL_LINEAR)
    lora = peftkit.wrap(shared_weights_copy(base), config).train()
    floor = shared_weights_copy(base).train()
    floor.enable_input_require_grads()
    for name, model in (("peftkit LoRA all-linear r16 dropout 0.05", lora), ("floor", floor)):
        model(**inputs).loss.backward()  # warm-up
        with torch.profiler.profile() as profile:
            model(**inputs).loss.backward()
        print(f"\n{name}")
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
