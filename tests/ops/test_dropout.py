"""The fast path's dropout draws against the law they claim: i.i.d. Bernoulli(p) per element.

Counts are checked within 5 binomial standard deviations (a correct draw fails about once in 1.7
million runs); the gap law against the geometric tail ``(1 - p)^k`` within 5 standard deviations of a
proportion. The zeroing is checked against masks built here by plain indexing.
"""

from __future__ import annotations

import pytest
import torch

from peftkit.ops import draw_dropout
from peftkit.ops import dropout as dropout_module
from peftkit.ops.dropout import (
    POSITIONS_UP_TO,
    dropped_mask,
    dropped_positions,
    keep_mask,
    zero_dropped_,
)


def within_binomial(count: int, trials: int, p: float) -> bool:
    return abs(count - trials * p) <= 5 * (trials * p * (1 - p)) ** 0.5


@pytest.mark.parametrize("p", [0.05, 0.2])
def test_positions_are_sorted_distinct_in_range_and_binomial(p: float) -> None:
    torch.manual_seed(0)
    numel = 999_999  # not a round number
    positions = dropped_positions(numel, p)
    assert positions.dtype == torch.int64 and positions.dim() == 1
    assert bool((positions[1:] > positions[:-1]).all()), "sorted and distinct"
    assert int(positions[0]) >= 0 and int(positions[-1]) < numel
    assert within_binomial(positions.numel(), numel, p)
    halves = int((positions < numel // 2).sum())  # no drift along the tensor
    assert within_binomial(halves, positions.numel(), 0.5)


def test_gaps_follow_the_geometric_law() -> None:
    """P(gap ≥ k) = (1 - p)^(k - 1) for the steps from one drop to the next."""
    torch.manual_seed(1)
    p = 0.05
    gaps = dropped_positions(2_000_000, p).diff()
    for k in (1, 2, 5, 20, 60):
        share = (1 - p) ** (k - 1)
        assert within_binomial(int((gaps >= k).sum()), gaps.numel(), share), k


def test_seeded_draws_repeat_and_later_draws_differ() -> None:
    torch.manual_seed(3)
    first = dropped_positions(10_000, 0.1)
    torch.manual_seed(3)
    assert torch.equal(dropped_positions(10_000, 0.1), first)
    assert not torch.equal(dropped_positions(10_000, 0.1), first)


def test_running_short_of_gaps_draws_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first batch of gaps is cut to three: the rest must come from further draws, same law."""
    real = dropout_module._gaps
    calls: list[int] = []

    def first_call_short(count: int, log_keep: float, device) -> torch.Tensor:
        calls.append(count)
        gaps = real(count, log_keep, device)
        return gaps[:3] if len(calls) == 1 else gaps

    monkeypatch.setattr(dropout_module, "_gaps", first_call_short)
    torch.manual_seed(4)
    positions = dropped_positions(50_000, 0.05)
    assert len(calls) >= 2
    assert bool((positions[1:] > positions[:-1]).all()) and int(positions[-1]) < 50_000
    assert within_binomial(positions.numel(), 50_000, 0.05)


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_mask_drops_the_stated_share(p: float) -> None:
    """Kept share within 5 standard deviations of the returned keep probability (1 - p to 1/65536)."""
    x = torch.empty(1000, 999)  # not a multiple of 4 (four 16-bit draws per 64-bit word)
    torch.manual_seed(11)
    mask, keep = dropped_mask(x, p)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert abs(keep - (1 - p)) <= 0.5 / 65536
    assert within_binomial(int(mask.sum()), mask.numel(), 1 - keep)
    torch.manual_seed(11)
    assert torch.equal(dropped_mask(x, p)[0], mask)


def test_draw_dropout_picks_the_form_by_p() -> None:
    x = torch.empty(40, 30)
    assert draw_dropout(x, 0.0) == (None, 1.0)
    positions, keep = draw_dropout(x, POSITIONS_UP_TO)
    assert positions.dtype == torch.int64 and keep == 1 - POSITIONS_UP_TO
    mask, _ = draw_dropout(x, 0.5)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match="must be in"):
            draw_dropout(x, p)


@pytest.mark.parametrize("p", [0.1, 0.5], ids=["positions", "mask"])
def test_zero_dropped_zeroes_exactly_the_dropped_elements(p: float) -> None:
    torch.manual_seed(5)
    x = torch.randn(6, 7, 9)
    dropped, _ = draw_dropout(x, p)
    expected_keep = torch.ones(x.numel())
    if dropped.dtype == torch.bool:
        expected_keep[dropped.reshape(-1)] = 0
    else:
        expected_keep[dropped] = 0
    expected_keep = expected_keep.view(x.shape)
    assert 0 < int((expected_keep == 0).sum()) < x.numel()
    assert torch.equal(zero_dropped_(x.clone().view(-1, 9), dropped).view(x.shape), x * expected_keep)
    assert torch.equal(keep_mask(dropped, x), expected_keep)
