"""Next-token choice: a pure function checked against plain reasoning, and against what used to break it
(tiny temperatures, a top_p that rounds to 0 in float32, NaN scores)."""

from __future__ import annotations

import pytest
import torch

from peftkit.serve.sampling import SamplingParams, next_token


def test_temperature_zero_is_the_argmax() -> None:
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert next_token(logits, SamplingParams(max_tokens=1, temperature=0), None) == 1


@pytest.mark.parametrize("temperature", [8e-38, 1e-45, 9e-6])
def test_a_tiny_temperature_is_greedy_not_an_error(temperature: float) -> None:
    """Before: logits / 8e-38 overflowed to inf and the softmax gave NaN ("probability tensor contains
    inf/nan"), failing the whole batch."""
    logits = torch.tensor([0.1, 40.0, 39.9, -1.0])
    params = SamplingParams(max_tokens=1, temperature=temperature)
    assert {next_token(logits, params, torch.Generator().manual_seed(s)) for s in range(20)} == {1}


def test_a_small_temperature_above_the_greedy_bound_still_samples_safely() -> None:
    logits = torch.tensor([0.0, 30.0, 29.9999, -1.0])  # two near-equal leaders
    params = SamplingParams(max_tokens=1, temperature=1e-4)
    picks = {next_token(logits, params, torch.Generator().manual_seed(s)) for s in range(200)}
    assert picks <= {1, 2} and 1 in picks


@pytest.mark.parametrize("top_p", [0.01, 1e-6, 1e-300])
def test_a_small_top_p_keeps_only_the_most_likely_token(top_p: float) -> None:
    """1e-300 rounds to 0 in float32: before, no token was kept and sampling raised."""
    logits = torch.tensor([1.0, 3.0, 2.9, 0.0])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p)
    picks = {next_token(logits, params, torch.Generator().manual_seed(s)) for s in range(50)}
    assert picks == {1}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.8)  # 0.5 + 0.3 reaches 0.8: two tokens
    picks = {next_token(probs.log(), params, torch.Generator().manual_seed(s)) for s in range(200)}
    assert picks == {0, 1}


def test_sampling_follows_the_distribution_and_the_seed() -> None:
    logits = torch.tensor([0.25, 0.75]).log()
    params = SamplingParams(max_tokens=1, temperature=1.0)
    generator = torch.Generator().manual_seed(0)
    draws = [next_token(logits, params, generator) for _ in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.75) < 0.03  # ± 4.4 standard deviations
    replay = torch.Generator().manual_seed(0)
    assert [next_token(logits, params, replay) for _ in range(50)] == draws[:50]


def test_temperature_scales_the_distribution() -> None:
    logits = torch.tensor([0.0, 1.0])  # p(1) = e / (1 + e) at T=1; at T=0.5: e² / (1 + e²)
    params = SamplingParams(max_tokens=1, temperature=0.5)
    generator = torch.Generator().manual_seed(1)
    share = sum(next_token(logits, params, generator) for _ in range(4000)) / 4000
    expected = torch.sigmoid(torch.tensor(2.0)).item()  # 0.881
    assert abs(share - expected) < 0.03  # ± 5.9 standard deviations


def test_nan_scores_are_an_error_of_that_row_when_sampling() -> None:
    logits = torch.tensor([0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="NaN"):
        next_token(logits, SamplingParams(max_tokens=1, temperature=1.0), torch.Generator().manual_seed(0))
