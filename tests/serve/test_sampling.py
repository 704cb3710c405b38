"""Next-token choice and stop strings: pure functions checked against plain reasoning."""

from __future__ import annotations

import pytest
import torch

from peftkit.serve.sampling import SamplingParams, emittable_length, find_stop, next_token


def test_temperature_zero_is_the_argmax() -> None:
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert next_token(logits, SamplingParams(max_tokens=1, temperature=0), None) == 1


def test_a_small_top_p_keeps_only_the_most_likely_token() -> None:
    logits = torch.tensor([1.0, 3.0, 2.9, 0.0])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.01)
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


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello world", ("wor",), 6),
        ("hello", ("x", "ll"), 2),
        ("hello", ("x",), None),
        ("a.b.", (".", "b"), 1),
    ],
)
def test_find_stop_gives_the_earliest_stop(text, stops, expected) -> None:
    assert find_stop(text, stops) == expected


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello wo", ("world",), 6),  # "wo" may start "world": held back
        ("hello w", ("xyz",), 7),
        ("abc\ufffd", (), 3),  # half a character
        ("abcEN", ("END", "N!"), 3),
    ],
)
def test_emittable_length_holds_back_what_may_become_a_stop(text, stops, expected) -> None:
    assert emittable_length(text, stops) == expected
