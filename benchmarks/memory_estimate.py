"""``peftkit.memory.estimate`` against ``measure_training_step`` on the same model: the errors, printed.

    python benchmarks/memory_estimate.py --batch 2 --seq 128

Cases: a tiny Llama (random weights, seconds) and SmolLM2-135M-Instruct, full fine-tuning and LoRA
(all-linear r16 with dropout 0.05 on the fast and the plain path, q,v r16). Error = estimate / measured - 1.
"""

from __future__ import annotations

import argparse

import torch
from common import machine, random_tokens, table
from torch import nn

import peftkit
from peftkit.memory import estimate, measure_training_step
from peftkit.ops import fast_lora

COMPONENTS = ("weights", "gradients", "optimizer_states", "activations", "peak")


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def smollm2() -> nn.Module:
    from peftkit.models import load_model

    return load_model()[0]


CASES = {
    "full fine-tuning": (None, True),
    "LoRA all-linear r16, dropout 0.05": (
        dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"),
        True,
    ),
    "LoRA all-linear r16, dropout 0.05, fast path off": (
        dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"),
        False,
    ),
    "LoRA q,v r16": (dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]), True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    print(machine())
    rows = []
    models = {"tiny Llama": (tiny_llama, 4, 32)}
    if not args.skip_smollm2:
        models["SmolLM2-135M"] = (smollm2, args.batch, args.seq)
    for model_name, (build, batch, seq) in models.items():
        for case, (lora_kwargs, fast) in CASES.items():
            model = build().train()
            config = model.config
            lora = peftkit.LoraConfig(**lora_kwargs) if lora_kwargs else None
            if lora is not None:
                model = peftkit.wrap(model, lora).train()
            ids = random_tokens(batch, seq, config.vocab_size)
            with fast_lora(fast):
                measured = measure_training_step(model, {"input_ids": ids, "labels": ids})
            result = estimate(config, method=lora or "lora", batch=batch, seq=seq, fast_lora=fast)
            predicted = result.full if lora is None else result.peft
            cells = []
            for name in COMPONENTS:
                got, want = getattr(predicted, name), getattr(measured, name)
                cells.append(f"{want / 2**20:.1f} → {got / 2**20:.1f} ({got / want - 1:+.1%})")
            rows.append([f"{model_name} {batch}x{seq}", case, *cells])
            del model
    headers = ["model", "case", *(f"{c}: measured → estimated MiB (error)" for c in COMPONENTS)]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
