"""DPO training step time and peak memory: peftkit vs TRL's DPOTrainer on Hugging Face PEFT, one process.

    python benchmarks/preference_step.py --pairs 4 --prompt 256 --answer 256 --rounds 5

Each pair is a prompt and two answers of random tokens (the rejected one 16 tokens shorter, so rows
are padded as in real batches); a sequence is prompt + answer (512 tokens by default). Both libraries
put the same LoRA (all-linear, r 16, alpha 32, no dropout: TRL's DPOTrainer switches dropout off) on
one shared copy of SmolLM2-135M-Instruct's frozen weights (float32), and take AdamW steps at learning
rate 0 (the whole arithmetic of a step runs; the weights stay equal).

- **TRL DPOTrainer + HF PEFT**: ``trainer.compute_loss`` on a batch from TRL's own collator (the
  policy's forward over prompt + chosen and prompt + rejected rows, the reference's forward with the
  adapter off, both through TRL's chunked log-prob head), then backward and the optimizer step:
  what ``DPOTrainer.training_step`` does per step (TRL defaults otherwise; no gradient checkpointing,
  no bf16, as for peftkit).
- **peftkit**: ``peftkit train``'s step (``objectives.preference``): one row per pair sharing its prompt,
  answer tokens only through the fused log-prob head, the reference's log-probabilities computed once
  before training (their one-off cost is the "reference pass" row, per pair).
- **peftkit, reference in the step**: the same, plus the reference's forward (adapter off) in every
  step, for a like-for-like count of forwards.
- **peftkit, two rows per pair**: TRL's layout (no prompt sharing), reference precomputed.

Steps are interleaved round-robin after a warm-up; medians and ratios to TRL. Peak memory is tracked
tensors (``peftkit.memory.measure_training_step``: parameters, buffers, optimizer state and the most
bytes of operator-created tensors alive at once), measured after the timing, one variant at a time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import ALL_LINEAR, Variant, adamw_stepper, interleaved, machine, shared_weights_copy, table
from torch import nn

import peftkit
from peftkit.memory import measure_training_step
from peftkit.objectives.choice import PreferenceSettings
from peftkit.objectives.pair_batch import collate_pairs
from peftkit.objectives.preference import preference_objective
from peftkit.objectives.sequences import sequence_log_probs

TRL = "TRL DPOTrainer + HF PEFT"


def random_pairs(pairs: int, prompt: int, answer: int, vocab: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=generator).tolist()

    return [
        {"prompt_ids": ids(prompt), "chosen_ids": ids(answer), "rejected_ids": ids(max(1, answer - 16))}
        for _ in range(pairs)
    ]


def trl_loss(base: nn.Module, tokenizer: object, r: int) -> tuple[nn.Module, Callable]:
    """An HF PEFT model inside a TRL DPOTrainer, and ``loss(model, batch)`` = the trainer's compute_loss."""
    import datasets
    import peft
    import trl

    model = peft.get_peft_model(
        shared_weights_copy(base),
        peft.LoraConfig(
            r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"
        ),
    )
    config = trl.DPOConfig(
        output_dir="/tmp/peftkit-bench-trl",
        per_device_train_batch_size=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        disable_tqdm=True,
        log_level="error",
    )
    placeholder = datasets.Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=placeholder, processing_class=tokenizer)
    return trainer.model.train(), lambda m, batch: trainer.compute_loss(m, batch)


def trl_batch(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=pad_id)(pairs)


def peftkit_parts(base: nn.Module, r: int) -> tuple[nn.Module, Callable]:
    model = peftkit.wrap(
        shared_weights_copy(base),
        peftkit.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=ALL_LINEAR),
    ).train()
    objective = preference_objective(PreferenceSettings.of("dpo"))

    def loss(m: nn.Module, batch: dict) -> torch.Tensor:
        total, pairs = objective(m, batch)
        return total / pairs

    return model, loss


@torch.no_grad()
def reference_log_probs(model: nn.Module, batch: dict) -> torch.Tensor:
    with model.disable_adapters():
        return sequence_log_probs(model, batch)[0]


def with_reference_in_step(loss: Callable) -> Callable:
    def step_loss(m: nn.Module, batch: dict) -> torch.Tensor:
        batch = {**batch, "reference_log_probs": reference_log_probs(m, batch)}
        return loss(m, batch)

    return step_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--answer", type=int, default=256, help="chosen answer tokens (rejected: 16 fewer)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    from peftkit.models import load_model

    base, tokenizer = load_model()
    base = base.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = random_pairs(args.pairs, args.prompt, args.answer, base.config.vocab_size)

    trl_model, trl_step_loss = trl_loss(base, tokenizer, args.r)
    ours, our_loss = peftkit_parts(base, args.r)
    shared = collate_pairs(pairs, pad_id, shared_prompt=True)
    two_rows = collate_pairs(pairs, pad_id, shared_prompt=False)
    tick = time.perf_counter()
    shared["reference_log_probs"] = reference_log_probs(ours, shared)
    reference_seconds = time.perf_counter() - tick
    two_rows["reference_log_probs"] = reference_log_probs(ours, two_rows)
    variants: dict[str, tuple[nn.Module, dict, Callable]] = {
        TRL: (trl_model, trl_batch(pairs, pad_id), trl_step_loss),
        "peftkit": (ours, shared, our_loss),
        "peftkit, reference in the step": (ours, shared, with_reference_in_step(our_loss)),
        "peftkit, two rows per pair": (ours, two_rows, our_loss),
    }
    steps = {name: adamw_stepper(model, batch, loss) for name, (model, batch, loss) in variants.items()}
    shape = f"{args.pairs} pairs, prompt {args.prompt} + answer {args.answer} tokens"
    print(f"timing {len(steps)} variants: {shape}")
    timed = [Variant(name, step) for name, (step, _) in steps.items()]
    interleaved(timed, args.rounds, args.warmup)
    print_results(timed, {}, args, reference_seconds)  # the times first: the peaks take a while
    if not args.no_peak:
        peaks: dict[str, int] = {}
        for name, (model, batch, loss) in variants.items():
            peaks[name] = measure_training_step(model, batch, steps[name][1], loss).peak
            print(f"  peak of {name}: {peaks[name] / 2**20:.0f} MiB", flush=True)
        print_results(timed, peaks, args, reference_seconds)
    print(machine())


def print_results(
    timed: list[Variant], peaks: dict[str, int], args: argparse.Namespace, reference: float
) -> None:
    medians = {v.name: v.median for v in timed}
    rows = []
    for variant in timed:
        name = variant.name
        rows.append(
            [
                name,
                f"{variant.median:.2f} s",
                f"{min(variant.times):.2f}–{max(variant.times):.2f}",
                f"{variant.median / medians[TRL]:.2f}",
                f"{peaks[name] / 2**20:.0f} MiB" if name in peaks else "",
                f"{peaks[name] / peaks[TRL]:.2f}" if name in peaks and TRL in peaks else "",
            ]
        )
    rows.append(["peftkit reference pass (once, before training)", f"{reference:.2f} s", "", "", "", ""])
    headers = [
        f"{args.pairs} pairs x ({args.prompt} + {args.answer})",
        "step (median)",
        "min–max",
        "/ TRL",
        "peak (tracked tensors)",
        "peak / TRL",
    ]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
