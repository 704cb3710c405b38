"""Per-sequence answer log-probabilities (objectives/sequences.py, objectives/pair_batch.py) against the
plain computation: each sequence run alone through the model, ``log_softmax`` of its whole logits, summed
over the answer's tokens.

Both layouts (a shared prompt in one row, two rows per pair), the fused head and whole logits, sdpa and
eager attention, values and the adapter's gradients. Tolerance 1e-5 (float32; the same arithmetic up
to the order of sums and padding).
"""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.objectives.pair_batch import collate_pairs, pair_attention_mask
from peftkit.objectives.sequences import sequence_log_probs, shares_prompts
from peftkit.ops import fused_cross_entropy

from helpers.tiny_lm import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 120
PAIRS = [  # (prompt, chosen, rejected): different lengths, a one-token answer, a shared first token
    ([5, 9, 11, 3], [7, 8, 2], [7, 30, 31, 32, 2]),
    ([4, 6], [40], [41, 42]),
    ([12, 13, 14, 15, 16, 17], [50, 51, 52, 53], [54, 2]),
]


def rows() -> list[dict]:
    return [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS]


def wrapped_model(attention: str = "sdpa") -> torch.nn.Module:
    base = build_model(VOCAB, seed=1)
    base.config._attn_implementation = attention
    model = peftkit.wrap(base, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # a non-zero update, so the adapter's gradients are all non-trivial
        generator = torch.Generator().manual_seed(2)
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def plain_sums(model: torch.nn.Module) -> torch.Tensor:
    """Every chosen answer, then every rejected one, each run alone (no padding, no custom mask)."""
    sums = []
    for key in (1, 2):
        for pair in PAIRS:
            prompt, answer = pair[0], pair[key]
            ids = torch.tensor([prompt + answer])
            logits = model(input_ids=ids).logits[0, -ids.shape[1] :].float()  # (len, vocab): soft prompts off
            log_probs = torch.log_softmax(logits, dim=-1)
            sums.append(sum(log_probs[len(prompt) - 1 + t, token] for t, token in enumerate(answer)))
    return torch.stack(sums)


def adapter_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


WEIGHTS = torch.tensor([0.3, -1.2, 0.7, 1.1, -0.4, 0.9])  # a different upstream gradient per sequence


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-prompt", "two-rows"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "logits"])
def test_sums_and_gradients_equal_each_sequence_run_alone(attention: str, shared: bool, fused: bool) -> None:
    model = wrapped_model(attention)
    expected = plain_sums(model)
    (expected * WEIGHTS).sum().backward()
    expected_grads = adapter_grads(model)
    model.zero_grad()

    batch = collate_pairs(rows(), pad_id=0, shared_prompt=shared)
    with fused_cross_entropy(fused):
        sums, counts = sequence_log_probs(model, batch)
    (sums * WEIGHTS).sum().backward()
    assert counts.tolist() == [3, 1, 4, 5, 2, 2]
    torch.testing.assert_close(sums, expected.detach(), atol=1e-5, rtol=0)
    for got, want in zip(adapter_grads(model), expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_shared_rows_are_shorter_than_two_rows() -> None:
    shared = collate_pairs(rows(), pad_id=0, shared_prompt=True)
    separate = collate_pairs(rows(), pad_id=0, shared_prompt=False)
    assert shared["input_ids"].shape == (3, 12)  # 6 + 4 + 2 tokens in the longest row
    assert separate["input_ids"].shape == (6, 10)
    assert shared["attention_mask"].sum() == sum(len(p) + len(c) + len(r) for p, c, r in PAIRS)
    assert shared["position_ids"][0].tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]


def test_mask_lets_the_rejected_answer_see_the_prompt_and_itself_only() -> None:
    # prompt (2 tokens), chosen (2), rejected (2), one padding token
    segments = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(pair_attention_mask(segments)[0, 0], expected)
    additive = pair_attention_mask(segments, torch.float32)[0, 0]
    assert torch.equal(additive == 0, expected)
    assert additive.min() == torch.finfo(torch.float32).min


def test_prompts_are_shared_only_where_the_mask_is_read_as_given() -> None:
    assert shares_prompts(wrapped_model("sdpa")) and shares_prompts(wrapped_model("eager"))
    assert shares_prompts(build_model(VOCAB))  # a plain transformers model (full fine-tuning)
    windowed = wrapped_model()
    windowed.config.sliding_window = 16
    assert not shares_prompts(windowed)
    prompt = peftkit.wrap(
        build_model(VOCAB), peftkit.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    )
    assert not shares_prompts(prompt)


def test_soft_prompts_score_the_same_in_two_rows() -> None:
    model = peftkit.wrap(
        build_model(VOCAB, seed=1), peftkit.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    )
    batch = collate_pairs(rows(), pad_id=0, shared_prompt=False)
    sums, _ = sequence_log_probs(model, batch)
    torch.testing.assert_close(sums, plain_sums(model).detach(), atol=1e-5, rtol=0)
