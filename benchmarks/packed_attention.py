"""Attention for packed rows: per-example SDPA (peftkit) vs a block-diagonal mask (transformers), one process.

    python benchmarks/packed_attention.py --data-dir /path/to/dialogsum --rows 2 --rounds 3

DialogSum's training rows as ``examples/dialogsum.yaml`` prepares them (SmolLM2 chat template,
max_length 768) are packed by best-fit decreasing; one micro-batch of ``--rows`` packed rows (a seeded
choice) trains a LoRA r16 all-linear step (fused loss, AdamW at learning rate 0) through each attention:

- **per-example SDPA** (peftkit's ``objectives.packed``): the rows laid end to end as one sequence, SDPA
  once per example with ``is_causal`` and no mask tensor;
- **SDPA, block-diagonal mask**: the rows as a (rows, max_length) batch with ``position_ids``
  restarting per example and no attention mask, from which transformers builds a block-diagonal
  causal mask (``masking_utils.find_packed_sequence_indices``); a row's padded tail is its own block;
- **eager, block-diagonal mask**: the same through transformers' eager attention;
- **flex attention** (compiled ``flex_attention`` with transformers' block mask): tried; PyTorch 2.13 has
  no backward for it on the CPU, so it is reported as not runnable.

Steps are interleaved round-robin after a warm-up; peak memory is tracked tensors
(``peftkit.memory.measure_training_step``). All variants give the same loss (printed, to check).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    ALL_LINEAR,
    Variant,
    adamw_stepper,
    interleaved,
    load_smollm2,
    machine,
    shared_weights_copy,
    table,
)
from torch import Tensor, nn

import peftkit
from peftkit.foundation.tasks import IGNORE_INDEX
from peftkit.memory import measure_training_step
from peftkit.objectives.tokens import head_inputs, loss_sum
from peftkit.ops import linear_cross_entropy
from peftkit.training.data import collate_packed, position_ids, prepare_data
from peftkit.training.data.packing import pack
from peftkit.training.train_config import load_config

REPO = Path(__file__).resolve().parents[1]


def dialogsum_rows(data_dir: Path, max_length: int) -> tuple[list[dict], int]:
    """DialogSum's training rows packed as ``peftkit train examples/dialogsum.yaml`` packs them, and
    the pad id."""
    from peftkit.foundation.loading import load_tokenizer

    config = load_config(
        REPO / "examples" / "dialogsum.yaml",
        {
            "data": str(data_dir / "dev.jsonl"),
            "validation_data": str(data_dir / "test.jsonl"),
            "max_length": max_length,
        },
    )
    tokenizer = load_tokenizer(config.model)
    train = prepare_data(config.replace(packing=False), tokenizer).train
    return pack(train, max_length).to_list(), tokenizer.eos_token_id


def masked_rows_batch(rows: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Packed rows as a (rows, width) batch with restarting position ids and no attention mask (the
    padded tail of a row is a block of its own, labels ignored): what transformers' mask path reads."""
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n], labels[i, :n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        positions[i] = position_ids([*row["lengths"], width - n] if width > n else row["lengths"])
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def mask_path_loss(implementation: str) -> Callable[[nn.Module, dict[str, Tensor]], Tensor]:
    """The summed fused loss of a :func:`masked_rows_batch` with the model's attention set to
    ``implementation`` (transformers then builds the block-diagonal mask)."""

    def loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        config = model.get_base_model().config
        previous, config._attn_implementation = config._attn_implementation, implementation
        try:
            head = model.get_base_model().lm_head
            with head_inputs(head) as captured:
                model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
            hidden, labels = captured[-1][:, :-1], batch["labels"][:, 1:]
            flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (rows x width, hidden)
            return linear_cross_entropy(flat_hidden, head.weight, labels.reshape(-1))[0]
        finally:
            config._attn_implementation = previous

    return loss


def per_example_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return loss_sum(model, batch, "causal-lm")[0]


def flex_runs(model: nn.Module, batch: dict[str, Tensor]) -> str:
    """Whether a flex-attention training step runs here; the error's first line if not."""
    try:
        mask_path_loss("flex_attention")(model, batch).backward()
    except Exception as e:  # reported, not handled
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return "runs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/dialogsum"))
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--rows", type=int, default=2, help="packed rows per micro-batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-eager", action="store_true", help="leave out the (slow) eager variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    packed, pad_id = dialogsum_rows(args.data_dir, args.max_length)
    chosen = random.Random(args.seed).sample(packed, args.rows)
    examples = sum(len(row["lengths"]) for row in chosen)
    tokens = sum(len(row["input_ids"]) for row in chosen)
    print(f"{args.rows} packed rows of DialogSum: {examples} examples, {tokens} tokens")

    base = load_smollm2()
    config = peftkit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ALL_LINEAR)
    model = peftkit.wrap(shared_weights_copy(base), config).train()
    one_sequence, as_rows = collate_packed(chosen), masked_rows_batch(chosen, pad_id)
    cases = {"per-example SDPA (peftkit)": (one_sequence, per_example_loss)}
    cases["SDPA, block-diagonal mask"] = (as_rows, mask_path_loss("sdpa"))
    if not args.no_eager:
        cases["eager, block-diagonal mask"] = (as_rows, mask_path_loss("eager"))
    losses = {name: loss(model, batch).item() for name, (batch, loss) in cases.items()}
    steps = {name: adamw_stepper(model, batch, loss) for name, (batch, loss) in cases.items()}
    timed = [Variant(name, step) for name, (step, _) in steps.items()]
    interleaved(timed, args.rounds)
    peaks = {
        name: measure_training_step(model, cases[name][0], steps[name][1], cases[name][1]).peak
        for name in cases
    }
    first = timed[0]
    rows = [
        [
            v.name,
            f"{v.median:.2f} s",
            f"{min(v.times):.2f}–{max(v.times):.2f}",
            f"{tokens / v.median:.0f}",
            f"{v.median / first.median:.2f}",
            f"{peaks[v.name] / 2**20:.0f} MiB",
            f"{peaks[v.name] / peaks[first.name]:.2f}",
            f"{losses[v.name] / sum(r['targets'] for r in chosen):.5f}",
        ]
        for v in timed
    ]
    headers = ["attention", "step (median)", "min–max", "tokens/s", "/ per-ex.", "peak", "/ per-ex.", "loss"]
    print(table(headers, rows))
    print(f"flex attention: {flex_runs(model, as_rows)}")
    print(machine())


if __name__ == "__main__":
    main()
