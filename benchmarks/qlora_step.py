"""QLoRA training step: peftkit vs Hugging Face PEFT on the same NF4 base, one process; and the
weight memory of the base in float32 / bfloat16 / int8 / nf4.

    python benchmarks/qlora_step.py --batch 4 --seq 256 --rounds 8

SmolLM2-135M-Instruct loaded by ``peftkit.models.load_model(quantize="nf4")`` (bitsandbytes, double
quantization, float32 compute here: the CPU has no fast bfloat16 path) once per variant (the same
deterministic quantization), LoRA on every linear layer r16, dropout 0.05, AdamW at learning rate 0 on
random tokens. Steps are interleaved round-robin after warm-up; medians and ratios. Peak memory is
tracked tensors (``peftkit.memory.measure_training_step``), one untimed step per variant.
"""

from __future__ import annotations

import argparse

import torch
from common import ALL_LINEAR, Variant, interleaved, machine, random_tokens, table
from train_step import lora_configs, model_loss, peftkit_loss, stepper

import peftkit
from peftkit.foundation.quantization import is_quantized
from peftkit.memory import measure_training_step
from peftkit.models import load_model


def quantized_base(scheme: str = "nf4") -> torch.nn.Module:
    model, _ = load_model(quantize=scheme, quantization_options={"compute_dtype": "float32"})
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Parameter storages plus bitsandbytes' quantization state (block scales), each counted once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False))
        state = (
            getattr(getattr(module, "weight", None), "quant_state", None) if is_quantized(module) else None
        )
        if state is not None:
            tensors += [state.absmax, getattr(getattr(state, "state2", None), "absmax", None)]
        for tensor in tensors:
            if tensor is not None and tensor.untyped_storage().data_ptr() not in seen:
                seen.add(tensor.untyped_storage().data_ptr())
                total += tensor.untyped_storage().nbytes()
    return total


def main() -> None:
    from peft import get_peft_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())

    sizes = []
    for label, kwargs in (
        ("float32", {}),
        ("bfloat16", {"dtype": "bfloat16"}),
        ("int8", {"quantize": "int8"}),
        ("nf4 (double quantization)", {"quantize": "nf4"}),
    ):
        model, _ = load_model(**kwargs)
        sizes.append([label, f"{weight_bytes(model) / 2**20:.1f} MiB"])
        del model
    print(table(["SmolLM2-135M weights", "measured"], sizes))

    ours, theirs = lora_configs(16, 0.05, ALL_LINEAR)
    ids = random_tokens(args.batch, args.seq, 49152)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    hf = get_peft_model(quantized_base(), theirs).train()
    mine = peftkit.wrap(quantized_base(), ours).train()
    variants = {
        "HF PEFT QLoRA nf4": (hf, model_loss),
        "peftkit QLoRA nf4": (mine, model_loss),
        "peftkit QLoRA nf4, peftkit train's loss": (mine, peftkit_loss),
    }
    steps = {name: stepper(model, inputs, True, loss) for name, (model, loss) in variants.items()}
    timed = [Variant(name, step) for name, step in steps.items()]
    interleaved(timed, args.rounds)
    peaks = {
        name: measure_training_step(model, inputs, steps[name].optimizer, loss).peak
        for name, (model, loss) in variants.items()
    }
    hf_time, hf_peak = timed[0].median, peaks["HF PEFT QLoRA nf4"]
    rows = [
        [
            v.name,
            f"{v.median:.2f} s",
            f"{min(v.times):.2f}–{max(v.times):.2f}",
            f"{v.median / hf_time:.2f}",
            f"{peaks[v.name] / 2**20:.0f} MiB",
            f"{peaks[v.name] / hf_peak:.2f}",
        ]
        for v in timed
    ]
    headers = [
        f"{args.batch}x{args.seq}",
        "step (median)",
        "min–max",
        "/ HF PEFT",
        "peak (tracked)",
        "/ HF PEFT",
    ]
    print(table(headers, rows))
    print(machine())


if __name__ == "__main__":
    main()
