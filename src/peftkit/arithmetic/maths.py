"""Adapter arithmetic on weight updates: task arithmetic, TIES, DARE, magnitude pruning, low-rank fits.

Every function acts on the weight updates ΔWᵢ = sᵢ·BᵢAᵢ of one module (the "task vectors" of the
merging papers), flattened to matrices ``(out, in)``; none of them knows about modules or adapters.

- Task arithmetic: Ilharco et al., "Editing Models with Task Arithmetic" (2022), arXiv:2212.04089.
- TIES: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (2023),
  arXiv:2306.01708 (trim, elect sign, disjoint merge).
- DARE: Yu et al., "Language Models are Super Mario" (2023), arXiv:2311.03099 (drop and rescale).
- The best rank-k approximation in Frobenius norm is the truncated SVD (Eckart–Young).

Weights multiply the task vectors first (``τᵢ = wᵢ·ΔWᵢ``), so a negative weight negates a task before
signs are elected; TIES's disjoint merge then averages the agreeing entries, so the weights play the
role of the paper's scaling λ per task (weights ``[1, 1]`` give the paper's merge).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from peftkit.arithmetic.settings import COMBINATION_TYPES

__all__ = [
    "LowRankFit",
    "combine_deltas",
    "concatenate_factors",
    "disjoint_merge",
    "elect_sign",
    "low_rank_fit",
    "magnitude_trim",
    "random_drop",
]


def concatenate_factors(
    factors: Sequence[tuple[Tensor, Tensor, float]], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Factors of ``Σ wᵢ·sᵢ·BᵢAᵢ`` with scaling 1: ``A = [w₁s₁A₁; w₂s₂A₂; …]``, ``B = [B₁ B₂ …]``.

    Args:
        factors: per adapter ``(A: (rᵢ, in), B: (out, rᵢ), sᵢ)``.
        weights: one per adapter.

    Returns:
        ``(A: (Σrᵢ, in), B: (out, Σrᵢ))``; ``B @ A`` is the weighted sum exactly (up to float rounding).
    """
    A = torch.cat([w * s * a for (a, _, s), w in zip(factors, weights, strict=True)], dim=0)
    B = torch.cat([b for _, b, _ in factors], dim=1)
    return A, B


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """Keep the ``int(density·numel)`` entries of largest magnitude, zero the rest (TIES's "trim").

    Args:
        delta: any shape.
        density: in (0, 1].

    Returns:
        Same shape as ``delta``.
    """
    keep = int(density * delta.numel())
    if keep >= delta.numel():
        return delta.clone()
    flat = delta.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        mask[flat.abs().topk(keep).indices] = True
    return (flat * mask).view_as(delta)


def random_drop(delta: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: keep each entry with probability ``density`` and divide the kept ones by ``density``.

    The mask is drawn on the CPU from ``generator`` (or torch's global one when None), so a seeded
    generator gives the same mask on any device.

    Args:
        delta: any shape.
        density: in (0, 1].

    Returns:
        Same shape as ``delta``; its expectation over masks is ``delta``.
    """
    keep = torch.rand(delta.shape, generator=generator) < density  # CPU
    return delta * keep.to(delta.device) / density


def elect_sign(deltas: Tensor, method: str = "total") -> Tensor:
    """TIES's sign election per entry: +1 or −1 (ties go to +1, as in Hugging Face PEFT).

    Args:
        deltas: (tasks, ...) the trimmed (weighted) task vectors.
        method: ``"total"`` (sign of the sum of values: the paper's) or ``"frequency"`` (sign of the sum
            of signs: a majority vote).

    Returns:
        (...) of ±1, in ``deltas``' dtype.
    """
    votes = deltas.sum(0) if method == "total" else deltas.sign().sum(0)
    return torch.where(votes >= 0, 1.0, -1.0).to(deltas.dtype)


def disjoint_merge(deltas: Tensor, sign: Tensor) -> Tensor:
    """TIES's disjoint merge: per entry, the mean of the task values whose sign is the elected one.

    Zero entries (trimmed or dropped) never count; an entry no task agrees on is 0.

    Args:
        deltas: (tasks, ...).
        sign: (...) of ±1 from :func:`elect_sign`.

    Returns:
        (...).
    """
    agrees = deltas.sign() == sign  # (tasks, ...): zeros have sign 0 and never agree
    total = (deltas * agrees).sum(0)
    return total / agrees.sum(0).clamp(min=1)


def combine_deltas(
    combination_type: str,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The combined update a (non-``cat``) combination type defines, before any low-rank fit.

    - ``svd``, ``linear``: ``Σ wᵢ·ΔWᵢ``;
    - ``ties``: trim each ``wᵢ·ΔWᵢ`` to ``density``, elect signs, disjoint merge;
    - ``dare_linear``: ``Σ drop(wᵢ·ΔWᵢ)`` with :func:`random_drop`;
    - ``dare_ties``: drop as DARE, then elect signs and disjoint merge as TIES;
    - ``magnitude_prune``: ``Σ trim(wᵢ·ΔWᵢ)``.

    The ``*_svd`` names give the same update as their stem.

    Args:
        deltas: per task (out, in) updates of one module, all the same shape.
        weights: one per task.
        density: the share of entries kept, in (0, 1]; required by the trimming and dropping types.
        generator: DARE's random source (drawn from in task order).

    Returns:
        (out, in).
    """
    stem = combination_type.removesuffix("_svd")
    tasks = [w * d for d, w in zip(deltas, weights, strict=True)]
    if stem in ("svd", "linear", "cat"):
        return torch.stack(tasks).sum(0)
    if density is None:
        raise ValueError(f"combination_type={combination_type!r} needs density (the share of entries kept)")
    if stem in ("ties", "magnitude_prune"):
        kept = torch.stack([magnitude_trim(t, density) for t in tasks])
    elif stem in ("dare_linear", "dare_ties"):
        kept = torch.stack([random_drop(t, density, generator) for t in tasks])
    else:
        raise ValueError(f"combination_type={combination_type!r} is not one of {list(COMBINATION_TYPES)}")
    if stem in ("magnitude_prune", "dare_linear"):
        return kept.sum(0)
    return disjoint_merge(kept, elect_sign(kept, majority_sign_method))


class LowRankFit(NamedTuple):
    """A rank-k fit ``B @ A`` of a target update and how far it is from the target.

    Attributes:
        A: (k, in).
        B: (out, k).
        residual_norm: ‖target − B·A‖_F.
        target_norm: ‖target‖_F.
    """

    A: Tensor
    B: Tensor
    residual_norm: float
    target_norm: float

    @property
    def relative_error(self) -> float:
        """‖target − B·A‖_F / ‖target‖_F; 0 for a zero target."""
        return self.residual_norm / self.target_norm if self.target_norm > 0 else 0.0


def low_rank_fit(target: Tensor, rank: int, clamp: float | None = None) -> LowRankFit:
    """The best rank-``rank`` approximation of ``target`` in Frobenius norm (truncated SVD).

    Split as Hugging Face PEFT splits it: ``B = U_k·diag(S_k)``, ``A = V_kᵀ``. With ``clamp`` (a
    quantile in (0, 1], Hugging Face PEFT's ``svd_clamp``) the entries of both factors are clipped to
    ±(that quantile of their values), which makes the fit no longer the best one; the error reported
    is the clipped fit's.

    Args:
        target: (out, in).
        rank: k ≥ 1; more than ``min(out, in)`` gives ``min(out, in)`` (an exact fit).

    Returns:
        A :class:`LowRankFit` with ``A: (k, in)``, ``B: (out, k)``.
    """
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)  # (out, m), (m,), (m, in); m = min(out, in)
    k = min(rank, S.shape[0])
    B = U[:, :k] * S[:k]  # (out, k)
    A = Vh[:k]  # (k, in)
    if clamp is not None:
        limit = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-limit, limit), A.clamp(-limit, limit)
    residual = torch.linalg.matrix_norm(target - B @ A).item()
    return LowRankFit(A.contiguous(), B.contiguous(), residual, torch.linalg.matrix_norm(target).item())
