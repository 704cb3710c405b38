"""The combinations on ΔW against independent computations: per-entry Python loops for TIES / DARE /
pruning, NumPy's SVD and the Eckart–Young error formula for the low-rank fit.

Tolerances (float32 inputs of size ~1): 1e-6 absolute for sums and products of a few terms, 1e-5 for
SVD-based quantities compared with NumPy (float64).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from peftkit.arithmetic.maths import (
    combine_deltas,
    concatenate_factors,
    elect_sign,
    low_rank_fit,
    magnitude_trim,
    random_drop,
)

SHAPE = (4, 5)
WEIGHTS = [0.5, -1.0, 2.0]


def task_vectors(seed: int = 0, count: int = 3) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=generator) for _ in range(count)]


def reference_trim(delta: Tensor, density: float) -> Tensor:
    """Keep the k largest |entries| (k = floor(density·n)), found by sorting (continuous data: no ties)."""
    values = delta.flatten().tolist()
    k = int(density * len(values))
    order = sorted(range(len(values)), key=lambda i: -abs(values[i]))
    kept = [values[i] if i in order[:k] else 0.0 for i in range(len(values))]
    return torch.tensor(kept).view_as(delta)


def reference_ties_entry(values: list[float], method: str) -> float:
    """The TIES merge of one entry's task values (already trimmed/dropped and weighted), written out."""
    votes = sum(values) if method == "total" else sum((v > 0) - (v < 0) for v in values)
    sign = 1.0 if votes >= 0 else -1.0
    agreeing = [v for v in values if v != 0 and (v > 0) == (sign > 0)]
    return sum(agreeing) / len(agreeing) if agreeing else 0.0


def reference_merge(kept: list[Tensor], method: str) -> Tensor:
    out = torch.zeros(SHAPE)
    for i in range(SHAPE[0]):
        for j in range(SHAPE[1]):
            out[i, j] = reference_ties_entry([float(t[i, j]) for t in kept], method)
    return out


def test_concatenated_factors_multiply_to_the_weighted_sum() -> None:
    generator = torch.Generator().manual_seed(0)
    factors = [
        (torch.randn(r, 5, generator=generator), torch.randn(4, r, generator=generator), s)
        for r, s in [(2, 0.5), (3, 2.0)]
    ]
    A, B = concatenate_factors(factors, [0.7, -0.3])
    assert A.shape == (5, 5) and B.shape == (4, 5)
    expected = sum(w * s * b @ a for (a, b, s), w in zip(factors, [0.7, -0.3], strict=True))
    torch.testing.assert_close(B @ A, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.99, 1.0])
def test_magnitude_trim_keeps_the_largest_entries(density: float) -> None:
    delta = task_vectors()[0]
    trimmed = magnitude_trim(delta, density)
    assert torch.equal(trimmed, reference_trim(delta, density))
    assert int((trimmed != 0).sum()) == int(density * delta.numel())


def test_random_drop_keeps_a_share_and_rescales_and_is_seeded() -> None:
    delta = torch.randn(100, 100, generator=torch.Generator().manual_seed(0))
    dropped = random_drop(delta, 0.3, torch.Generator().manual_seed(5))
    kept = dropped != 0
    # kept entries are divided by the density, dropped ones are 0
    torch.testing.assert_close(dropped[kept], delta[kept] / 0.3, atol=1e-6, rtol=0)
    assert abs(kept.float().mean().item() - 0.3) < 0.02  # 10,000 Bernoulli(0.3) draws: sd 0.0046
    assert torch.equal(dropped, random_drop(delta, 0.3, torch.Generator().manual_seed(5)))
    assert not torch.equal(dropped, random_drop(delta, 0.3, torch.Generator().manual_seed(6)))


def test_random_drop_is_unbiased() -> None:
    delta = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    mean = torch.stack([random_drop(delta, 0.5, generator) for _ in range(4000)]).mean(0)
    # each entry: mean of 4000 draws of 2x·Bernoulli(0.5), sd |x|/sqrt(4000) ≈ 0.016·|x|
    torch.testing.assert_close(mean, delta, atol=0.1 * delta.abs().max().item(), rtol=0)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_is_trim_then_elect_then_disjoint_mean(method: str) -> None:
    deltas = task_vectors()
    merged = combine_deltas("ties", deltas, WEIGHTS, density=0.6, majority_sign_method=method)
    kept = [reference_trim(w * d, 0.6) for d, w in zip(deltas, WEIGHTS, strict=True)]
    torch.testing.assert_close(merged, reference_merge(kept, method), atol=1e-6, rtol=0)
    assert torch.equal(combine_deltas("ties_svd", deltas, WEIGHTS, 0.6, method), merged)


def test_the_two_sign_elections_differ_where_magnitude_and_count_disagree() -> None:
    stacked = torch.tensor([[3.0], [-1.0], [-1.0]])  # one large positive, two small negatives
    assert elect_sign(stacked, "total").item() == 1.0
    assert elect_sign(stacked, "frequency").item() == -1.0


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_ties_drops_then_merges_as_ties(method: str) -> None:
    deltas = task_vectors()
    merged = combine_deltas("dare_ties", deltas, WEIGHTS, 0.5, method, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)  # the same draws, in task order
    kept = [
        w * d * (torch.rand(SHAPE, generator=generator) < 0.5) / 0.5
        for d, w in zip(deltas, WEIGHTS, strict=True)
    ]
    torch.testing.assert_close(merged, reference_merge(kept, method), atol=1e-6, rtol=0)


def test_dare_linear_and_magnitude_prune_sum_the_kept_entries() -> None:
    deltas = task_vectors()
    generator = torch.Generator().manual_seed(3)
    dare = combine_deltas("dare_linear", deltas, WEIGHTS, 0.5, generator=torch.Generator().manual_seed(3))
    expected = sum(
        w * d * (torch.rand(SHAPE, generator=generator) < 0.5) / 0.5
        for d, w in zip(deltas, WEIGHTS, strict=True)
    )
    torch.testing.assert_close(dare, expected, atol=1e-6, rtol=0)
    pruned = combine_deltas("magnitude_prune", deltas, WEIGHTS, 0.4)
    expected = sum(reference_trim(w * d, 0.4) for d, w in zip(deltas, WEIGHTS, strict=True))
    torch.testing.assert_close(pruned, expected, atol=1e-6, rtol=0)


def test_density_one_ties_of_a_task_and_a_zero_weight_is_the_task() -> None:
    first, second = task_vectors(count=2)
    merged = combine_deltas("ties", [first, second], [1.0, 0.0], density=1.0)
    torch.testing.assert_close(merged, first, atol=0, rtol=0)


def test_svd_and_linear_are_the_weighted_sum() -> None:
    deltas = task_vectors()
    expected = 0.5 * deltas[0] - 1.0 * deltas[1] + 2.0 * deltas[2]
    for kind in ("svd", "linear"):
        torch.testing.assert_close(combine_deltas(kind, deltas, WEIGHTS), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
def test_low_rank_fit_is_the_truncated_svd_with_the_eckart_young_error(shape: tuple[int, int]) -> None:
    target = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    U, S, Vh = np.linalg.svd(target.double().numpy(), full_matrices=False)
    errors = []
    for rank in range(1, 7):
        fit = low_rank_fit(target, rank)
        assert fit.A.shape == (rank, shape[1]) and fit.B.shape == (shape[0], rank)
        best = torch.from_numpy(U[:, :rank] * S[:rank] @ Vh[:rank]).float()
        torch.testing.assert_close(fit.B @ fit.A, best, atol=1e-5, rtol=0)
        eckart_young = np.sqrt((S[rank:] ** 2).sum() / (S**2).sum())
        assert fit.relative_error == pytest.approx(eckart_young, abs=1e-5)
        errors.append(fit.relative_error)
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.3
    assert errors[-1] < 1e-6  # rank 6 = min(out, in): exact
    assert low_rank_fit(target, 50).A.shape[0] == 6  # capped at min(out, in)


def test_low_rank_fit_of_a_zero_update_has_zero_error() -> None:
    fit = low_rank_fit(torch.zeros(4, 5), 2)
    assert fit.relative_error == 0.0 and not fit.B.any()


def test_clamped_fit_clips_the_factors_and_costs_accuracy() -> None:
    target = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    exact, clamped = low_rank_fit(target, 4), low_rank_fit(target, 4, clamp=0.9)
    values = torch.cat([exact.B.flatten(), exact.A.flatten()])
    limit = torch.quantile(values, 0.9)
    assert clamped.B.abs().max() <= limit + 1e-7 and clamped.A.abs().max() <= limit + 1e-7
    torch.testing.assert_close(clamped.B, exact.B.clamp(-limit, limit), atol=0, rtol=0)
    assert clamped.relative_error > exact.relative_error
