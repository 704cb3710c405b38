"""What re-quantizing a merged QLoRA model changes: ``merge_and_unload(requantize=True)``'s report.

    python benchmarks/requantize_drift.py --std 0        # a zero update: the re-quantization alone
    python benchmarks/requantize_drift.py --std 0.002    # a random update of that size

SmolLM2-135M loaded in nf4 and int8, LoRA all-linear r8 with A initialised at random and B drawn from
N(0, std), merged and re-quantized with the scheme it was loaded in; the probe is the first 256 tokens
of the shipped English paragraph (as ``peftkit merge --requantize``). Prints the report per scheme.
"""

from __future__ import annotations

import argparse

import torch
from common import machine

import peftkit
from peftkit.compare.plan import GENERAL_TEXT
from peftkit.models import DEFAULT_MODEL, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--std", type=float, default=0.002, help="standard deviation of B's entries")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    for scheme in ("nf4", "int8"):
        torch.manual_seed(0)
        base, tokenizer = load_model(DEFAULT_MODEL, quantize=scheme)
        config = peftkit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)
        model = peftkit.wrap(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, args.std)
        probe = tokenizer(GENERAL_TEXT.read_text(), return_tensors="pt").input_ids[:, :256]
        merged = model.merge_and_unload(requantize=True, probe=probe)
        print(f"{scheme}, B ~ N(0, {args.std}): {merged.requantization_report}")


if __name__ == "__main__":
    main()
