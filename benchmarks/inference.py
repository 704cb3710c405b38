"""Inference with adapters: peftkit vs Hugging Face PEFT vs the base model, one process.

    python benchmarks/inference.py --rows 32 --seq 128 --adapters 8 --rounds 5

- mixed-adapter forward: ``rows`` rows of ``seq`` random tokens, row i using adapter i mod ``adapters``
  (LoRA all-linear r16, random weights), peftkit's and HF PEFT's ``adapter_names`` against the plain
  base model (a module tree without wrappers sharing the same weights);
- mixed-adapter ``generate``: one prompt per adapter (32 tokens), 32 new tokens, greedy;
- merged inference: one adapter merged into a private copy of the weights (wrappers still in place)
  against the base model, batch 4 x 256;
- adapter files: save and load time and size, LoRA all-linear r16.

All under ``torch.no_grad()``; variants interleaved round-robin after warm-up; medians and ratios.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch
from common import (
    ALL_LINEAR,
    Variant,
    interleaved,
    load_smollm2,
    machine,
    random_tokens,
    shared_weights_copy,
    table,
)
from torch import nn

import peftkit


def randomize(model: nn.Module, marker: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if marker in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def with_adapters(base: nn.Module, count: int, r: int) -> tuple[nn.Module, nn.Module, list[str]]:
    """(peftkit model, HF PEFT model, adapter names), both around ``base``'s weights, same adapter values."""
    import peft

    names = [f"a{i}" for i in range(count)]
    ours = peftkit.wrap(
        shared_weights_copy(base),
        peftkit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL_LINEAR),
        names[0],
    )
    hf_config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL_LINEAR)
    theirs = peft.get_peft_model(shared_weights_copy(base), hf_config, adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, peftkit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL_LINEAR))
        theirs.add_adapter(name, hf_config)
    randomize(ours, ".adapters.", 0)
    ours_state = {k: v for k, v in ours.named_parameters() if ".adapters." in k}
    with torch.no_grad():  # the same values in HF PEFT's layout: lora_A.<name>.weight
        for key, param in theirs.named_parameters():
            if ".lora_" not in key:
                continue
            module, kind, name, _ = key.rsplit(".", 3)
            module = module.removeprefix("base_model.model.")
            param.copy_(ours_state[f"model.{module}.adapters.{name}.{kind}.weight"])
    return ours.eval(), theirs.eval(), names


def mixed_forward(base: nn.Module, args: argparse.Namespace, skip: set[str]) -> list[list[str]]:
    ours, theirs, names = with_adapters(base, args.adapters, args.r)
    plain = shared_weights_copy(base)
    ids = random_tokens(args.rows, args.seq, base.config.vocab_size)
    row_names = [names[i % len(names)] for i in range(args.rows)]
    rows: list[list[str]] = []
    with torch.no_grad():
        check = (
            ours(input_ids=ids, adapter_names=row_names).logits
            - theirs(input_ids=ids, adapter_names=row_names).logits
        )
        print(f"  peftkit vs HF PEFT logits, max |diff| = {check.abs().max().item():.2e}")
        variants = [
            Variant("base model", lambda: plain(input_ids=ids)),
            Variant("HF PEFT adapter_names", lambda: theirs(input_ids=ids, adapter_names=row_names)),
            Variant("peftkit adapter_names", lambda: ours(input_ids=ids, adapter_names=row_names)),
        ]
        if "forward" not in skip:
            interleaved(variants, args.rounds, args.warmup)
            rows += ratio_rows(variants, f"forward {args.rows}x{args.seq}, {args.adapters} adapters")
    if "generate" in skip:
        return rows
    prompt = random_tokens(len(names), 32, base.config.vocab_size, seed=1)
    settings = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False, "pad_token_id": 0}
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        same = torch.equal(
            ours.generate(input_ids=prompt, attention_mask=mask, adapter_names=names, **settings),
            theirs.generate(input_ids=prompt, attention_mask=mask, adapter_names=names, **settings),
        )
        print(f"  peftkit and HF PEFT generate the same tokens: {same}")
        generate = [
            Variant(
                "base model generate",
                lambda: plain.generate(input_ids=prompt, attention_mask=mask, **settings),
            ),
            Variant(
                "HF PEFT generate adapter_names",
                lambda: theirs.generate(
                    input_ids=prompt, attention_mask=mask, adapter_names=names, **settings
                ),
            ),
            Variant(
                "peftkit generate adapter_names",
                lambda: ours.generate(input_ids=prompt, attention_mask=mask, adapter_names=names, **settings),
            ),
        ]
        interleaved(generate, args.rounds, args.warmup)
    rows += ratio_rows(generate, f"generate {len(names)} rows x 32 new tokens, one adapter per row")
    return rows


def merged(base: nn.Module, args: argparse.Namespace) -> list[list[str]]:
    plain = shared_weights_copy(base)
    model = peftkit.wrap(copy.deepcopy(base), peftkit.LoraConfig(r=args.r, target_modules=ALL_LINEAR))
    randomize(model, ".adapters.", 1)
    model.merge_adapter()
    model.eval()
    ids = random_tokens(4, 256, base.config.vocab_size, seed=2)
    with torch.no_grad():
        variants = [
            Variant("base model", lambda: plain(input_ids=ids)),
            Variant("peftkit merged (wrappers in place)", lambda: model(input_ids=ids)),
        ]
        interleaved(variants, args.rounds, args.warmup)
    return ratio_rows(variants, "forward 4x256, one adapter merged")


def ratio_rows(variants: list[Variant], what: str) -> list[list[str]]:
    reference = variants[0].median
    return [
        [
            what,
            v.name,
            f"{v.median:.3f} s",
            f"{min(v.times):.3f}–{max(v.times):.3f}",
            f"{v.median / reference:.2f}",
        ]
        for v in variants
    ]


def adapter_files(base: nn.Module, args: argparse.Namespace) -> list[list[str]]:
    import peft

    config = {"r": args.r, "lora_alpha": 2 * args.r, "target_modules": ALL_LINEAR}
    ours = peftkit.wrap(shared_weights_copy(base), peftkit.LoraConfig(**config))
    theirs = peft.get_peft_model(shared_weights_copy(base), peft.LoraConfig(**config))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, theirs_dir = Path(tmp, "peftkit"), Path(tmp, "hf")

        def ours_load() -> None:
            peftkit.load(shared_weights_copy(base), ours_dir)

        def theirs_load() -> None:
            peft.PeftModel.from_pretrained(shared_weights_copy(base), theirs_dir)

        save = [
            Variant("HF PEFT save_pretrained", lambda: theirs.save_pretrained(theirs_dir)),
            Variant("peftkit save_pretrained", lambda: ours.save_pretrained(ours_dir)),
        ]
        interleaved(save, args.rounds, args.warmup)
        load = [Variant("HF PEFT from_pretrained", theirs_load), Variant("peftkit load", ours_load)]
        interleaved(load, args.rounds, args.warmup)
        for variant, directory in (
            (save[0], theirs_dir),
            (save[1], ours_dir),
            (load[0], theirs_dir),
            (load[1], ours_dir),
        ):
            size = sum(f.stat().st_size for f in directory.iterdir())
            rows.append(
                [
                    "adapter file, LoRA all-linear r16",
                    variant.name,
                    f"{variant.median:.3f} s",
                    f"{min(variant.times):.3f}–{max(variant.times):.3f}",
                    f"{size / 2**20:.2f} MiB",
                ]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated: forward, generate, merged, files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    base = load_smollm2()
    skip = set(args.skip.split(","))
    rows: list[list[str]] = []
    started = time.perf_counter()
    if not {"forward", "generate"} <= skip:
        rows += mixed_forward(base, args, skip)
    if "merged" not in skip:
        rows += merged(base, args)
    print(table(["what", "variant", "median", "min–max", "/ base model"], rows))
    if "files" not in skip:
        print(table(["what", "variant", "median", "min–max", "size"], adapter_files(base, args)))
    print(f"total {time.perf_counter() - started:.0f} s, pid {os.getpid()}")


if __name__ == "__main__":
    main()
