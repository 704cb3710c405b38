"""The memory estimate of a QLoRA step against a measured one, nf4 and int8.

    python benchmarks/quantized_estimate.py smollm2-135m-instruct 2 128    # MODEL BATCH SEQ

LoRA q, k, v, o r8 on a base loaded by ``load_model(quantize=...)`` (float32 compute), the model's own
loss, ``measure_training_step`` against ``estimate(..., quantize=...)``.
"""

from __future__ import annotations

import sys

import torch

import peftkit
from peftkit.memory import estimate, measure_training_step
from peftkit.models import load_model


def main() -> None:
    name, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(2)
    mib = 2**20
    for scheme in ("nf4", "int8"):
        base, _ = load_model(name, quantize=scheme, quantization_options={"compute_dtype": "float32"})
        lora = peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = peftkit.wrap(base, lora)
        torch.manual_seed(0)
        ids = torch.randint(0, 100, (batch, seq))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        measured = measure_training_step(model, inputs)
        predicted = estimate(name, method=lora, batch=batch, seq=seq, quantize=scheme).peft
        print(
            f"{scheme}: estimate weights {predicted.weights / mib:.1f} activations "
            f"{predicted.activations / mib:.1f} peak {predicted.peak / mib:.1f} MiB | measured weights "
            f"{measured.weights / mib:.1f} activations {measured.activations / mib:.1f} peak "
            f"{measured.peak / mib:.1f} MiB | ratio {predicted.peak / measured.peak:.3f}"
        )


if __name__ == "__main__":
    main()
