"""Training step time and peak memory: peftkit vs Hugging Face PEFT vs full fine-tuning, one process.

    python benchmarks/train_step.py --batch 4 --seq 256 --rounds 10

Each variant is a model around the same SmolLM2-135M weights (the PEFT variants share one frozen copy,
full fine-tuning has its own), trained with AdamW at learning rate 0 (the full arithmetic of a step
runs; the weights stay equal for every variant) on random tokens. Steps are interleaved round-robin
after warm-up; the table gives medians and ratios.

Peak memory is **tracked tensors**, not RSS: one extra, untimed step per variant under
``peftkit.memory.measure_training_step`` (the parameters, buffers and optimizer state held, plus the
most bytes of tensors created by operators alive at once). RSS cannot separate variants that live in
one process; the tracked peak leaves out the runtime itself (~0.4 GB of libraries) and allocator slack.
With ``--peaks-apart`` each variant's peak is measured first, in a process of its own that builds every
variant's model and runs one step of that variant; its maximum RSS is reported next to the peak.
"""

from __future__ import annotations

import argparse
import copy
import resource
import subprocess
import sys
from collections.abc import Callable

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
from peftkit.memory import measure_training_step
from peftkit.objectives.tokens import fused_model_loss, loss_sum
from peftkit.ops import fast_lora


def peftkit_model(base: nn.Module, config: object) -> nn.Module:
    return peftkit.wrap(shared_weights_copy(base), config).train()


def hf_model(base: nn.Module, config: object) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(shared_weights_copy(base), config).train()


def lora_configs(r: int, dropout: float, targets: list[str], dora: bool = False) -> tuple[object, object]:
    """(peftkit config, HF PEFT config) with the same fields."""
    import peft

    kwargs = {"r": r, "lora_alpha": 2 * r, "lora_dropout": dropout, "target_modules": targets}
    dora_kwargs = {"use_dora": True} if dora else {}
    return peftkit.LoraConfig(**kwargs, **dora_kwargs), peft.LoraConfig(**kwargs, **dora_kwargs)


def ia3_configs() -> tuple[object, object]:
    import peft

    kwargs = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    return peftkit.IA3Config(**kwargs), peft.IA3Config(**kwargs)


def model_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss (transformers: whole logits, then cross-entropy): what Trainer uses."""
    return model(**inputs).loss


def peftkit_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of ``peftkit train``: ``objectives.tokens.loss_sum`` (fused head + cross-entropy), mean."""
    total, count = loss_sum(model, inputs, "causal-lm")
    return total / count


def fused_own_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss (``ForCausalLMLoss``'s value and gradients) computed by the fused head:
    ``peftkit.objectives.tokens.fused_model_loss``, what ``peftkit.integrations.Trainer`` runs."""
    with fused_model_loss(model):
        return model(**inputs).loss


def stepper(
    model: nn.Module, inputs: dict[str, torch.Tensor], fast: bool = True, loss_fn: Callable = model_loss
) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    # The floor variant trains nothing: an optimizer over a dummy parameter keeps the loop the same.
    optimizer = torch.optim.AdamW(params or [torch.zeros(1, requires_grad=True)], lr=0.0)

    def step() -> None:
        with fast_lora(fast):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, inputs).backward()
            optimizer.step()

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument(
        "--only", default="", help="comma-separated variant names, exact or a part of them (default: all)"
    )
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--peaks-apart",
        action="store_true",
        help="measure each variant's peak in a process of its own (big shapes: one process holding every "
        "variant's step runs out of memory)",
    )
    parser.add_argument("--peak-of", default="", help=argparse.SUPPRESS)  # internal: one variant's peak
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())

    base = load_smollm2()
    ids = random_tokens(args.batch, args.seq, base.config.vocab_size)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    variants: dict[str, tuple[nn.Module, bool, Callable]] = {}  # name -> (model, fast path, loss)
    full = copy.deepcopy(base).train()
    variants["full fine-tuning"] = (full, True, model_loss)
    for label, dropout, targets in (
        ("LoRA all-linear r16 dropout 0.05", 0.05, ALL_LINEAR),
        ("LoRA all-linear r16 dropout 0", 0.0, ALL_LINEAR),
        ("LoRA q,v r16 dropout 0.05", 0.05, ["q_proj", "v_proj"]),
    ):
        ours, theirs = lora_configs(args.r, dropout, targets)
        variants[f"HF PEFT {label}"] = (hf_model(base, theirs), True, model_loss)
        model = peftkit_model(base, ours)
        variants[f"peftkit {label}"] = (model, True, model_loss)
        if targets == ALL_LINEAR:
            variants[f"peftkit {label}, peftkit train's loss"] = (model, True, peftkit_loss)
            variants[f"peftkit {label}, own loss fused"] = (model, True, fused_own_loss)
        if dropout and targets == ALL_LINEAR:
            variants[f"peftkit {label}, fast path off"] = (model, False, model_loss)
            checkpointed = peftkit_model(base, ours)
            checkpointed.gradient_checkpointing_enable()
            variants[f"peftkit {label}, gradient checkpointing"] = (checkpointed, True, model_loss)
    # What any adapter implementation pays at least: the frozen model's forward and its backward to
    # the inputs (no adapter, no weight gradient).
    floor = shared_weights_copy(base).train()
    floor.enable_input_require_grads()
    variants["floor: frozen model, input gradients only"] = (floor, True, model_loss)
    variants["floor, own loss fused"] = (floor, True, fused_own_loss)
    ours, theirs = lora_configs(args.r, 0.05, ALL_LINEAR, dora=True)
    variants["HF PEFT DoRA all-linear r16 dropout 0.05"] = (hf_model(base, theirs), True, model_loss)
    variants["peftkit DoRA all-linear r16 dropout 0.05"] = (peftkit_model(base, ours), True, model_loss)
    ours, theirs = ia3_configs()
    variants["HF PEFT IA3 (k, v, down)"] = (hf_model(base, theirs), True, model_loss)
    variants["peftkit IA3 (k, v, down)"] = (peftkit_model(base, ours), True, model_loss)
    if args.peak_of:
        model, fast, loss = variants[args.peak_of]
        step = stepper(model, inputs, fast, loss)
        with fast_lora(fast):
            peak = measure_training_step(model, inputs, step.optimizer, loss).peak
        print(f"PEAK {peak} RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}")
        return
    if args.only:
        keep = [name.strip() for name in args.only.split(",") if name.strip()]
        exact = [name for name in keep if name in variants]
        parts = [name for name in keep if name not in variants]
        variants = {k: v for k, v in variants.items() if k in exact or any(name in k for name in parts)}

    peaks: dict[str, int] = {}
    rss: dict[str, int] = {}
    if args.peaks_apart and not args.no_peak:
        # Before timing, while this process holds only the models: after the timed steps its heap stays
        # large (freed memory is not given back), and it and a child together ran out of memory.
        for name in variants:
            peaks[name], rss[name] = peak_in_own_process(name, args)
    steps = {name: stepper(model, inputs, fast, loss) for name, (model, fast, loss) in variants.items()}
    print(f"timing {len(steps)} variants, batch {args.batch} x seq {args.seq}, {args.rounds} rounds")
    timed = [Variant(name, step) for name, step in steps.items()]
    interleaved(timed, args.rounds, args.warmup)
    print_results(
        timed, peaks, args, rss
    )  # the times first: measuring peaks of big shapes can run out of memory
    if args.no_peak or args.peaks_apart:
        print(machine())
        return

    for name, (model, fast, loss) in variants.items():
        with fast_lora(fast):
            measured = measure_training_step(model, inputs, steps[name].optimizer, loss)
        peaks[name] = measured.peak
    print_results(timed, peaks, args)
    print(machine())


def peak_in_own_process(name: str, args: argparse.Namespace) -> tuple[int, int]:
    """The tracked peak of variant ``name`` and the process's maximum RSS, in bytes, measured by this
    script in a fresh process (which builds every variant's model and runs one step of ``name``)."""
    command = [
        sys.executable,
        __file__,
        "--peak-of",
        name,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
    ]
    command += ["--threads", str(args.threads), "--r", str(args.r)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    fields = next(line.split() for line in out.splitlines() if line.startswith("PEAK "))
    return int(fields[1]), int(fields[3])


def print_results(
    timed: list[Variant], peaks: dict[str, int], args: argparse.Namespace, rss: dict[str, int] | None = None
) -> None:
    rss = rss or {}
    medians = {v.name: v.median for v in timed}
    full = medians.get("full fine-tuning")
    rows = []
    for variant in timed:
        name = variant.name
        twin = "HF PEFT " + name.removeprefix("peftkit ").removesuffix(", fast path off")
        twin = twin.removesuffix(", gradient checkpointing").removesuffix(", peftkit train's loss")
        twin = twin.removesuffix(", own loss fused")
        vs_hf = medians.get(twin) if name.startswith("peftkit") else None
        peak_hf = peaks.get(twin) if name.startswith("peftkit") else None
        rows.append(
            [
                name,
                f"{variant.median:.2f} s",
                f"{min(variant.times):.2f}–{max(variant.times):.2f}",
                f"{variant.cpu_median:.2f} s",
                f"{variant.median / full:.2f}" if full else "",
                f"{variant.median / vs_hf:.2f}" if vs_hf else "",
                f"{peaks[name] / 2**20:.0f} MiB" if name in peaks else "",
                f"{peaks[name] / peak_hf:.2f}" if peak_hf and name in peaks else "",
            ]
        )
        if rss:
            rss_hf = rss.get(twin) if name.startswith("peftkit") else None
            rows[-1] += [f"{rss[name] / 2**30:.2f} GiB", f"{rss[name] / rss_hf:.2f}" if rss_hf else ""]
    headers = [
        f"{args.batch}x{args.seq}",
        "step (median)",
        "min–max",
        "CPU time (median)",
        "/ full FT",
        "/ HF PEFT",
        "peak (tracked tensors)",
        "peak / HF PEFT",
    ]
    if rss:
        headers += ["max RSS (own process)", "RSS / HF PEFT"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
