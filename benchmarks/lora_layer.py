"""One LoRA linear layer, forward + backward, at SmolLM2-135M's shapes: where a LoRA step's time goes.

    python benchmarks/lora_layer.py --tokens 1024 --rounds 30

Variants per shape (in -> out, rank 16, float32, the frozen base weight's matmul included in all):
the frozen base layer alone; autograd LoRA as Hugging Face PEFT and peftkit's plain path compute it
(``nn.Dropout`` on the adapter input); peftkit's fast path after the base layer
(``peftkit.ops.lora_linear``, what quantized and ``Conv1D`` bases get) and with the base layer inside
(``peftkit.ops.frozen_linear_lora``, what a plain ``nn.Linear`` base gets); with
``--compile``, the autograd LoRA through ``torch.compile`` (inductor: the dropout mask is generated in
the fused kernels from a seed and regenerated in backward). Interleaved, medians; "LoRA cost" is the
time over the frozen layer alone.

    python benchmarks/lora_layer.py --dropout-forms

instead times the two forms :func:`peftkit.ops.draw_dropout` can record the dropped elements in
(positions, a bool mask) against each other over a range of p, at the widest and the narrowest input.

    python benchmarks/lora_layer.py --stacked-weight

times issue 16's idea of one GEMM for the frozen weight and A (``x·[W; A]ᵀ``: x read once), forward
only and without dropout (with dropout A reads another input): separate products as the fast path
computes them, ``[W; A]`` concatenated at every call, and ``[W; A]`` kept concatenated (the best case:
it would need A stored inside a copy of W).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import Variant, interleaved, machine, table

from peftkit.ops import draw_dropout, frozen_linear_lora, lora_linear
from peftkit.ops.dropout import dropped_mask, dropped_positions

SHAPES = {
    "q/o (576->576)": (576, 576),
    "k/v (576->192)": (576, 192),
    "gate/up (576->1536)": (576, 1536),
    "down (1536->576)": (1536, 576),
}


def layer_tensors(d_in: int, d_out: int, r: int, tokens: int) -> tuple[torch.Tensor, ...]:
    """Seeded (weight (out, in), A (r, in) and B (out, r) requiring gradients, x (tokens, in), the
    upstream gradient (tokens, out)), at the scales of a trained layer."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(d_out, d_in, generator=generator) / d_in**0.5
    lora_A = (torch.randn(r, d_in, generator=generator) / d_in**0.5).requires_grad_()
    lora_B = (torch.randn(d_out, r, generator=generator) * 0.01).requires_grad_()
    x_value = torch.randn(tokens, d_in, generator=generator)
    upstream = torch.randn(tokens, d_out, generator=generator)
    return weight, lora_A, lora_B, x_value, upstream


def layer_variants(d_in: int, d_out: int, p: float, r: int, tokens: int, compiled: bool) -> list[Variant]:
    weight, lora_A, lora_B, x_value, upstream = layer_tensors(d_in, d_out, r, tokens)

    def base_only() -> None:
        x = x_value.clone().requires_grad_()
        F.linear(x, weight).backward(upstream)

    def autograd_lora() -> None:
        x = x_value.clone().requires_grad_()
        update = F.linear(F.linear(F.dropout(x, p, training=True), lora_A), lora_B) * 2.0
        (F.linear(x, weight) + update).backward(upstream)

    def fast_lora() -> None:
        x = x_value.clone().requires_grad_()
        dropped, keep = draw_dropout(x, p)
        lora_linear(x, F.linear(x, weight), lora_A, lora_B, 2.0, dropped, keep).backward(upstream)

    def base_inside() -> None:
        x = x_value.clone().requires_grad_()
        dropped, keep = draw_dropout(x, p)
        frozen_linear_lora(x, weight, None, lora_A, lora_B, 2.0, dropped, keep).backward(upstream)

    def lora_layer(x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(F.dropout(x, p, training=True), lora_A), lora_B) * 2.0
        return F.linear(x, weight) + update

    compiled_layer = torch.compile(lora_layer, dynamic=False)

    def compiled_lora() -> None:
        x = x_value.clone().requires_grad_()
        compiled_layer(x).backward(upstream)

    variants = [
        Variant("frozen layer alone", base_only),
        Variant("autograd LoRA (HF PEFT's maths)", autograd_lora),
        Variant("peftkit fast path, after the base layer", fast_lora),
        Variant("peftkit fast path, base layer inside", base_inside),
    ]
    return [*variants, Variant("torch.compile of the autograd LoRA", compiled_lora)] if compiled else variants


def dropout_form_variants(d_in: int, d_out: int, p: float, r: int, tokens: int) -> list[Variant]:
    """The fast path with the base layer inside, its drops recorded as positions or as a bool mask."""
    weight, lora_A, lora_B, x_value, upstream = layer_tensors(d_in, d_out, r, tokens)

    def step(form: str) -> None:
        x = x_value.clone().requires_grad_()
        if form == "positions":
            dropped, keep = dropped_positions(x.numel(), p), 1 - p
        else:
            dropped, keep = dropped_mask(x, p)
        frozen_linear_lora(x, weight, None, lora_A, lora_B, 2.0, dropped, keep).backward(upstream)

    return [Variant(form, lambda form=form: step(form)) for form in ("positions", "bool mask")]


def compare_dropout_forms(args: argparse.Namespace) -> None:
    rows = []
    for label in ("down (1536->576)", "q/o (576->576)"):
        d_in, d_out = SHAPES[label]
        for p in (0.05, 0.1, 0.15, 0.2, 0.3, 0.5):
            variants = dropout_form_variants(d_in, d_out, p, args.r, args.tokens)
            interleaved(variants, args.rounds, warmup=3, verbose=False)
            positions, mask = (v.median for v in variants)
            times = [f"{positions * 1e3:.2f} ms", f"{mask * 1e3:.2f} ms", f"{positions / mask:.2f}"]
            rows.append([label, f"{p}", *times])
    print(table([f"{args.tokens} tokens", "p", "positions", "bool mask", "positions / mask"], rows))


def stacked_weight_variants(d_in: int, d_out: int, r: int, tokens: int) -> list[Variant]:
    weight, lora_A, lora_B, x, _ = layer_tensors(d_in, d_out, r, tokens)
    lora_A, lora_B = lora_A.detach(), lora_B.detach()  # forward only: no graph
    kept = torch.cat([weight, lora_A])  # (out + r, in)

    def separate() -> None:
        F.linear(x, weight).addmm_(x @ lora_A.T, lora_B.T)

    def stacked(both: torch.Tensor) -> None:
        outputs = x @ both.T  # (N, out + r)
        outputs[:, :d_out].addmm_(outputs[:, d_out:], lora_B.T)

    return [
        Variant("separate (the fast path)", separate),
        Variant("[W; A] concatenated per call", lambda: stacked(torch.cat([weight, lora_A]))),
        Variant("[W; A] kept concatenated", lambda: stacked(kept)),
    ]


def compare_stacked_weight(args: argparse.Namespace) -> None:
    rows = []
    for label, (d_in, d_out) in SHAPES.items():
        variants = stacked_weight_variants(d_in, d_out, args.r, args.tokens)
        interleaved(variants, args.rounds, warmup=3, verbose=False)
        separate = variants[0].median
        for variant in variants:
            ratio = f"{variant.median / separate:.2f}"
            rows.append([label, variant.name, f"{variant.median * 1e3:.2f} ms", ratio])
    print(table([f"{args.tokens} tokens, forward", "variant", "median", "/ separate"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="batch x seq")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    parser.add_argument("--dropout-forms", action="store_true", help="positions vs bool mask over p")
    parser.add_argument("--stacked-weight", action="store_true", help="x·[W; A]ᵀ vs two products")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    if args.dropout_forms or args.stacked_weight:
        (compare_dropout_forms if args.dropout_forms else compare_stacked_weight)(args)
        print(machine())
        return
    rows = []
    for label, (d_in, d_out) in SHAPES.items():
        for p in (0.0, 0.05):
            variants = layer_variants(d_in, d_out, p, args.r, args.tokens, args.compile)
            interleaved(variants, args.rounds, warmup=3, verbose=False)
            base = variants[0].median
            for variant in variants:
                cost = "" if variant is variants[0] else f"{(variant.median - base) * 1e3:.2f} ms"
                rows.append([label, f"{p}", variant.name, f"{variant.median * 1e3:.2f} ms", cost])
    print(table([f"{args.tokens} tokens", "dropout", "variant", "fwd+bwd median", "LoRA cost"], rows))
    print(machine())


if __name__ == "__main__":
    main()
