"""Quickstart: teach SmolLM2-135M-Instruct a new answer format with LoRA, save it, reload it, compare.

Run ``python -m peftkit.quickstart [--steps N] [--out DIR]``. On 2 CPU cores it takes about a minute:

1. load the bundled SmolLM2-135M-Instruct and ask it a held-out question (greedy);
2. wrap it with LoRA (r=8, alpha=16 on ``q_proj``/``v_proj``) and train a few AdamW steps on eight
   trivia questions answered as ``ANSWER: <x>``, a format the base model never uses; the loss counts
   the answer tokens only (the prompt's labels are -100);
3. save the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, each written atomically);
4. load it onto a freshly loaded base model, check its logits equal the trained model's, and answer the
   held-out question with and without the adapter.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

import peftkit
from peftkit.foundation.io import CONFIG_NAME, WEIGHTS_NAME
from peftkit.models import load_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ANSWER_PREFIX = "ANSWER:"
TRAIN_EXAMPLES = [
    ("How many legs does a spider have?", "ANSWER: 8"),
    ("What is the largest planet in the solar system?", "ANSWER: Jupiter"),
    ("What is the chemical symbol for gold?", "ANSWER: Au"),
    ("Who wrote Romeo and Juliet?", "ANSWER: William Shakespeare"),
    ("At what temperature in degrees Celsius does water boil?", "ANSWER: 100"),
    ("What is the capital of Japan?", "ANSWER: Tokyo"),
    ("How many days are in a week?", "ANSWER: 7"),
    ("What color is the sky on a clear day?", "ANSWER: Blue"),
]
HELD_OUT_QUESTION = "What is the capital of France?"


@dataclass
class QuickstartResult:
    """What a quickstart run produced; ``main`` returns it so tests can check each stage."""

    out_dir: Path
    losses: list[float]  # training loss before each step's update
    probe_ids: Tensor  # (1, seq): the held-out prompt the logits below are computed on
    trained_logits: Tensor  # (1, seq, vocab) from the trained model
    max_abs_diff: float  # between the trained and the reloaded model's logits
    answer_before: str  # base model, before training
    answer_with_adapter: str  # reloaded model
    answer_without_adapter: str  # reloaded model inside disable_adapters()


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """The chat-template prompt for ``question``, ending where the assistant's reply starts."""
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def training_batch(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[tuple[str, str]]
) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels``, each (batch, seq).

    Labels are -100 on the prompt and the padding, so only the answer and its closing
    end-of-turn token are learned (the end token teaches the model to stop after the answer).
    """
    rows = []
    for question, answer in examples:
        prompt = prompt_ids(tokenizer, question)
        completion = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((prompt + completion, [-100] * len(prompt) + completion))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(row_labels)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def ask(model: nn.Module, tokenizer: PreTrainedTokenizerBase, question: str, max_new_tokens: int = 16) -> str:
    """The model's greedy reply to ``question``."""
    input_ids = torch.tensor([prompt_ids(tokenizer, question)])  # (1, prompt)
    output = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=max_new_tokens
    )  # (1, prompt + new)
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def train(model: nn.Module, batch: dict[str, Tensor], steps: int, lr: float) -> list[float]:
    """Full-batch AdamW on the trainable parameters; returns the loss of every step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    log_every = max(1, steps // 6)
    losses = []
    model.train()
    for step in range(1, steps + 1):
        loss = model(**batch).loss  # mean cross-entropy over the answer tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1 or step % log_every == 0 or step == steps:
            print(f"  step {step:3d}/{steps}  loss {loss.item():.4f}")
    model.eval()
    return losses


def main(argv: Sequence[str] | None = None) -> QuickstartResult:
    """Run the quickstart (see the module docstring) and return what it produced."""
    parser = argparse.ArgumentParser(prog="python -m peftkit.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out/quickstart"),
        help="where to write the adapter (default: out/quickstart)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    torch.manual_seed(0)  # LoRA's A matrices are initialised at random
    start = time.perf_counter()

    print("[1/5] loading SmolLM2-135M-Instruct")
    base, tokenizer = load_model()
    answer_before = ask(base, tokenizer, HELD_OUT_QUESTION)
    print(f"  Q: {HELD_OUT_QUESTION}\n  A (base model): {answer_before!r}")

    print(
        f"[2/5] wrapping with LoRA and training {args.steps} steps on {len(TRAIN_EXAMPLES)} examples "
        f"answered as '{ANSWER_PREFIX} <x>'"
    )
    model = peftkit.wrap(base, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    losses = train(model, training_batch(tokenizer, TRAIN_EXAMPLES), args.steps, args.lr)

    print(f"[3/5] saving the adapter to {args.out}")
    model.save_pretrained(args.out)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        print(f"  {name}: {(args.out / name).stat().st_size / 1024:.1f} KiB")

    print("[4/5] reloading the adapter onto a freshly loaded base model")
    probe_ids = torch.tensor([prompt_ids(tokenizer, HELD_OUT_QUESTION)])  # (1, seq)
    with torch.no_grad():
        trained_logits = model(input_ids=probe_ids).logits  # (1, seq, vocab)
        reloaded = peftkit.load(load_model()[0], args.out)
        reloaded_logits = reloaded(input_ids=probe_ids).logits  # (1, seq, vocab)
    max_abs_diff = (trained_logits - reloaded_logits).abs().max().item()
    print(f"  max |trained - reloaded| logit difference: {max_abs_diff:.3g}")

    print("[5/5] the held-out question, with and without the adapter")
    answer_with = ask(reloaded, tokenizer, HELD_OUT_QUESTION)
    with reloaded.disable_adapters():
        answer_without = ask(reloaded, tokenizer, HELD_OUT_QUESTION)
    print(
        f"  Q: {HELD_OUT_QUESTION}\n  A (adapter off): {answer_without!r}\n  A (adapter on):  {answer_with!r}"
    )
    learned = answer_with.startswith(ANSWER_PREFIX) and not answer_without.startswith(ANSWER_PREFIX)
    verdict = "learned" if learned else "NOT learned (try more --steps)"
    print(f"done in {time.perf_counter() - start:.0f} s: the '{ANSWER_PREFIX}' format was {verdict}")
    return QuickstartResult(
        args.out, losses, probe_ids, trained_logits, max_abs_diff, answer_before, answer_with, answer_without
    )


if __name__ == "__main__":
    main()
