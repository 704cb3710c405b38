"""objectives.packed: a packed batch gives every example the loss, logits and gradients it has alone.

Reference: the same model run on each example alone (one row, no padding, transformers' own SDPA), in
float32. Families: Llama (rotary positions; SmolLM2 too, slow), Mistral, Qwen2, Qwen3, Gemma 3 (a
sliding window shorter than the examples), Phi-3 and GPT-2 (learned absolute positions), with LoRA
(dropout 0, random B so the adapters change the outputs); Gemma 2 (soft-capped attention) is refused.
Tolerance 1e-5 absolute on logits, losses and gradients; bit-identical where a neighbouring example
changes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import peftkit
from peftkit.foundation.tasks import IGNORE_INDEX
from peftkit.objectives.packed import PACKED_ATTENTION, packed_attention, packing_support
from peftkit.objectives.tokens import forward_logits, loss_sum
from peftkit.ops import fused_cross_entropy
from peftkit.training.data import collate_packed

from helpers.tiny_models import TINY_MODELS, VOCAB, randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Gemma 3's sliding window (4) is shorter than most examples (LENGTHS), so the window is checked too
GEMMA = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
FAMILIES = {
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 8}),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", GEMMA),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"sliding_window": None}),
}


@dataclass(frozen=True)
class Decoder:
    name: str
    targets: tuple[str, ...] | str
    build: Callable[[], nn.Module]

    def make(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().eval()


def family_model(name: str) -> nn.Module:
    return family_model_config(*FAMILIES[name])


def family_model_config(model_class: str, config_class: str, extra: dict) -> nn.Module:
    import transformers

    return getattr(transformers, model_class)(getattr(transformers, config_class)(**SIZES, **extra))


DECODERS = {
    **{
        case.name: Decoder(case.name, tuple(case.targets), case.make)
        for case in TINY_MODELS
        if case.name in ("llama", "gpt2")
    },
    **{name: Decoder(name, "all-linear", functools.partial(family_model, name)) for name in FAMILIES},
}
LENGTHS = (5, 11, 3, 8)
TOLERANCE = 1e-5


def examples(vocab: int, lengths: tuple[int, ...] = LENGTHS, seed: int = 0) -> list[dict[str, list[int]]]:
    """Token rows with a prompt (the first 2 labels ignored) and an answer."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX, IGNORE_INDEX, *ids[2:]]})
    return rows


def packed_batch(rows: list[dict[str, list[int]]], split: int = 2) -> dict[str, Tensor]:
    """``rows`` as two packed rows (the first ``split`` examples, then the rest), collated into one
    sequence, each example's first label ignored as packing ignores it."""

    def packed_row(part: list[dict[str, list[int]]]) -> dict[str, list[int]]:
        ids = [t for row in part for t in row["input_ids"]]
        labels = [t for row in part for t in [IGNORE_INDEX, *row["labels"][1:]]]
        return {"input_ids": ids, "labels": labels, "lengths": [len(row["input_ids"]) for row in part]}

    return collate_packed([packed_row(rows[:split]), packed_row(rows[split:])])


def alone(row: dict[str, list[int]]) -> dict[str, Tensor]:
    ids = torch.tensor([row["input_ids"]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([row["labels"]])}


def lora_model(case_name: str) -> nn.Module:
    case = DECODERS[case_name]
    model = case.make()  # eval mode: no dropout in the base
    targets = case.targets if isinstance(case.targets, str) else list(case.targets)
    wrapped = peftkit.wrap(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_adapters(wrapped)
    return wrapped


def gradients(model: nn.Module) -> dict[str, Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys() and actual
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=TOLERANCE, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------- tiny models
@pytest.mark.parametrize("case", list(DECODERS))
def test_packed_logits_are_each_example_alone(case: str) -> None:
    model = lora_model(case)
    rows = examples(VOCAB)
    with torch.no_grad():
        packed = forward_logits(model, packed_batch(rows), "causal-lm")[0]  # (tokens, vocab)
        expected = torch.cat([model(**alone(row)).logits[0] for row in rows])
    assert packed.shape == expected.shape
    torch.testing.assert_close(packed, expected, atol=TOLERANCE, rtol=0)
    assert model.get_base_model().config._attn_implementation == "sdpa"  # given back


@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "whole-logits"])
@pytest.mark.parametrize("case", list(DECODERS))
def test_each_example_of_a_packed_batch_has_its_own_loss_and_gradients(case: str, fused: bool) -> None:
    """One example scored at a time (the others' labels ignored) gives that example's loss and
    gradients alone; all scored together, the sums."""
    model = lora_model(case)
    rows = examples(VOCAB)
    totals, summed = [], {}
    with fused_cross_entropy(fused):
        for k, row in enumerate(rows):
            ignored = [dict(r, labels=[IGNORE_INDEX] * len(r["labels"])) for r in rows]
            ours = [row if i == k else ignored[i] for i in range(len(rows))]
            packed_loss, packed_count = loss_sum(model, packed_batch(ours), "causal-lm")
            packed_loss.backward()
            packed_grads = gradients(model)
            alone_loss, alone_count = loss_sum(model, alone(row), "causal-lm")
            alone_loss.backward()
            alone_grads = gradients(model)
            assert int(packed_count) == int(alone_count) == len(row["input_ids"]) - 2
            torch.testing.assert_close(packed_loss, alone_loss, atol=TOLERANCE, rtol=0)
            assert_close(packed_grads, alone_grads)
            totals.append(alone_loss.detach())
            summed = {n: summed.get(n, 0) + g for n, g in alone_grads.items()}
        all_loss, _ = loss_sum(model, packed_batch(rows), "causal-lm")
        all_loss.backward()
    torch.testing.assert_close(all_loss.detach(), torch.stack(totals).sum(), atol=TOLERANCE, rtol=0)
    assert_close(gradients(model), summed)


@pytest.mark.parametrize("case", list(DECODERS))
def test_changing_one_example_leaves_the_others_logits_bit_identical(case: str) -> None:
    model = lora_model(case)
    rows = examples(VOCAB)
    changed = [dict(row) for row in rows]
    changed[1] = examples(VOCAB, lengths=(LENGTHS[1],), seed=7)[0]  # same length, other tokens
    with torch.no_grad():
        before = forward_logits(model, packed_batch(rows), "causal-lm")[0]
        after = forward_logits(model, packed_batch(changed), "causal-lm")[0]
    second = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1])
    assert not torch.equal(before[second], after[second])
    keep = torch.ones(len(before), dtype=torch.bool)
    keep[second] = False
    assert torch.equal(before[keep], after[keep])


def test_gradient_checkpointing_needs_the_block_over_the_backward() -> None:
    """The backward runs the layers again: inside ``packed_attention`` it equals the plain backward;
    outside it the recomputation attends across examples, which torch's checkpointing refuses (why
    ``peftkit train`` holds the block over both)."""
    model = lora_model("llama")
    batch = packed_batch(examples(VOCAB))
    loss_sum(model, batch, "causal-lm")[0].backward()
    expected = gradients(model)
    model.gradient_checkpointing_enable()
    model.train()  # checkpointing recomputes in training mode only (dropout is 0 everywhere)
    with packed_attention(model):
        loss_sum(model, batch, "causal-lm")[0].backward()
    assert_close(gradients(model), expected)
    loss = loss_sum(model, batch, "causal-lm")[0]  # forward packed, backward recomputed outside
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        loss.backward()


def test_packed_attention_refuses_unpacked_calls_and_gives_the_attention_back() -> None:
    model = lora_model("llama")
    ids = torch.randint(1, VOCAB, (2, 6))
    with packed_attention(model), pytest.raises(ValueError, match="packed attention takes one packed row"):
        model(input_ids=ids, use_cache=False)
    config = model.get_base_model().config
    with packed_attention(model):
        with packed_attention(model):
            assert config._attn_implementation == PACKED_ATTENTION
        assert config._attn_implementation == PACKED_ATTENTION
    assert config._attn_implementation == "sdpa"


def test_packing_support_names_what_cannot_pack() -> None:
    by_name = {case.name: case for case in TINY_MODELS}
    assert packing_support(by_name["llama"].make()) is None
    gpt2 = peftkit.wrap(by_name["gpt2"].make(), peftkit.LoraConfig(target_modules=["c_attn"]))
    assert packing_support(gpt2) is None
    assert "not a decoder-only" in packing_support(by_name["bert"].make())  # bidirectional
    assert "not a decoder-only" in packing_support(by_name["t5"].make())
    assert "not a decoder-only" in packing_support(by_name["mlp-conv"].make())
    prompted = peftkit.wrap(by_name["llama"].make(), peftkit.PromptTuningConfig(num_virtual_tokens=2))
    assert "soft prompt" in packing_support(prompted)
    gemma2 = family_model_config("Gemma2ForCausalLM", "Gemma2Config", GEMMA)
    assert "soft-caps its attention scores" in packing_support(gemma2)
    eager = by_name["llama"].make()
    eager.config._attn_implementation = "flex_attention"
    assert "runs 'flex_attention' attention" in packing_support(eager)


# ------------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.slow
def test_smollm2_packed_examples_equal_each_alone() -> None:
    from peftkit.models import load_model

    model, _ = load_model()
    model = peftkit.wrap(model, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomize_adapters(model, scale=0.02)
    model.eval()
    rows = examples(model.get_base_model().config.vocab_size, lengths=(40, 17, 64, 25))
    with torch.no_grad():
        packed = forward_logits(model, packed_batch(rows), "causal-lm")[0]
        expected = torch.cat([model(**alone(row)).logits[0] for row in rows])
    torch.testing.assert_close(packed, expected, atol=TOLERANCE, rtol=0)
    # the loss as trained: summed, divided by the batch's answer tokens (the sums' gradients reach ~90,
    # where float32 keeps ~1e-5 absolute only by luck)
    packed_loss, count = loss_sum(model, packed_batch(rows), "causal-lm")
    (packed_loss / count).backward()
    packed_grads = gradients(model)
    for row in rows:
        (loss_sum(model, alone(row), "causal-lm")[0] / count).backward()
    assert_close(packed_grads, gradients(model))
