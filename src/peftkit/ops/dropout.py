"""Dropout for the fast LoRA path: which elements of the adapter's input are dropped, drawn cheaply.

A drop is i.i.d. Bernoulli(p) per element, as ``nn.Dropout``'s, from torch's default generator (so
``torch.manual_seed`` repeats it); the draws differ from ``nn.Dropout``'s for the same seed. Two forms
(``benchmarks/lora_layer.py --dropout-forms`` times them: positions were the faster at every p from
0.05 to 0.5), chosen by which is smaller:

- **positions** (``p ≤ POSITIONS_UP_TO``): the flat indices of the dropped elements, sorted, int64
  (8·p bytes per element: 0.4 at p = 0.05, against 1 for a bool mask). Drawn as geometric gaps between
  drops, ``floor(log(1 - u) / log(1 - p))`` from one float32 uniform ``u`` per drop, so only about
  ``p·n`` random numbers are drawn instead of one per element. Each gap follows the geometric law to
  within the float32 resolution of ``u`` (2⁻²⁴ ≈ 6e-8 in each tail probability); ``1/(1 - p)`` scales
  the kept elements exactly.
- **mask** (larger ``p``, where positions would take more than a byte per element): a ``bool`` tensor
  shaped like x, True where dropped, from 16 random bits per element (four per 64-bit draw): ``p`` is
  rounded to a multiple of 1/65536 (off by at most 7.6e-6) and the kept elements are scaled by that
  exact keep probability, so the expected output is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Largest p drawn as positions: 8 bytes per drop are 1 per element here, a bool mask's size.
POSITIONS_UP_TO = 0.125


def draw_dropout(x: Tensor, p: float) -> tuple[Tensor | None, float]:
    """Which elements of ``x`` to drop, and the keep probability to divide the kept ones by.

    Args:
        x: the tensor dropout applies to, any shape; only its size and device are read.
        p: drop probability in [0, 1).

    Returns:
        (dropped, keep_prob): dropped is None for ``p == 0``, 1-D int64 flat positions for
        ``p ≤ POSITIONS_UP_TO``, else a ``bool`` mask shaped like ``x``.

    Raises:
        ValueError: ``p`` outside [0, 1).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p!r} must be in [0, 1)")
    if p == 0.0:
        return None, 1.0
    if p <= POSITIONS_UP_TO:
        return dropped_positions(x.numel(), p, x.device), 1.0 - p
    return dropped_mask(x, p)


def dropped_positions(numel: int, p: float, device: torch.device | str | None = None) -> Tensor:
    """Sorted flat indices in ``[0, numel)``, each included independently with probability ``p``.

    Returns:
        (k,) int64, k ~ Binomial(numel, p).
    """
    log_keep = math.log1p(-p)
    draws = _gap_draws(numel, p)
    positions = _gaps(draws, log_keep, device).cumsum_(0).sub_(1)  # (draws,)
    while positions[-1] < numel:  # ran short: draw more gaps after the last drop
        more = _gaps(draws, log_keep, device).cumsum_(0).add_(positions[-1])
        positions = torch.cat([positions, more])
    return positions[: int(torch.searchsorted(positions, numel))]


def recorded_bytes(numel: int, p: float) -> int:
    """Bytes :func:`draw_dropout` keeps for a tensor of ``numel`` elements: the positions' storage (8
    per gap drawn, the few past the end included) or the bool mask; 0 without dropout."""
    if p == 0.0:
        return 0
    return 8 * _gap_draws(numel, p) if p <= POSITIONS_UP_TO else numel


def _gap_draws(numel: int, p: float) -> int:
    """Gaps drawn at first: the mean number of drops plus 6 standard deviations (a second draw is
    needed about once in 10⁹ calls) plus a margin for tiny tensors."""
    expected = numel * p
    return int(expected + 6 * math.sqrt(expected) + 16)


def _gaps(count: int, log_keep: float, device: torch.device | str | None) -> Tensor:
    """``count`` steps from one drop to the next: 1 + Geometric(p) failures, (count,) int64."""
    uniform = torch.rand(count, device=device)  # [0, 1): 1 - u is in (0, 1], its log finite
    return torch.log1p(uniform.neg_()).div_(log_keep).floor_().add_(1).to(torch.int64)


def dropped_mask(x: Tensor, p: float) -> tuple[Tensor, float]:
    """A ``bool`` mask shaped like ``x``, True where dropped, and the keep probability (1 - p to 1/65536)."""
    dropped_levels = round(p * 65536)  # a uniform 16-bit value below this is dropped
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-(2**63), None)  # all 64 bits random (the default range leaves the sign bit 0)
    uniform16 = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform on [-32768, 32767]
    return uniform16 < dropped_levels - 32768, 1.0 - dropped_levels / 65536


def zero_dropped_(values: Tensor, dropped: Tensor) -> Tensor:
    """Zero the dropped elements of a contiguous ``values`` in place and return it.

    Args:
        values: (..., features), shaped like the tensor ``dropped`` was drawn for (any view of it).
        dropped: as :func:`draw_dropout` returns it (positions or a bool mask).
    """
    if dropped.dtype == torch.bool:
        return values.masked_fill_(dropped.view(values.shape), 0)
    values.view(-1).index_fill_(0, dropped, 0)
    return values


def keep_mask(dropped: Tensor | None, like: Tensor) -> Tensor:
    """0./1. floats shaped like ``like``: 0 where dropped (for references and tests)."""
    ones = torch.ones(like.shape, dtype=torch.float32, device=like.device)
    return ones if dropped is None else zero_dropped_(ones, dropped)
