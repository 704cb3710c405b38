"""Many LoRA adapters in one batch: every row gets its own adapter in two batched matmuls per layer.

A layer's adapters are stacked once per model call (:func:`stack_lora`): slot 0 is "no adapter"
(zeros), ranks are zero-padded to the largest, and each adapter's scaling is folded into its B.
:func:`multi_lora` then computes ``y + s_k·B_k·A_k·x`` for every row with its own ``k``:

- few tokens (``generate``'s decoding steps): one matmul against all adapters' A rows side by side,
  the other adapters' columns zeroed per row, then one matmul against all B columns. Each adapter's
  weights are read once, nothing is copied, and the number of kernels does not grow with the number
  of adapters.
- many tokens (prompts, scoring): each row's A and B are gathered (a copy of r·(in + out) values per
  row) and applied with ``bmm``; the arithmetic is that of a single adapter.

:func:`multi_lora_reference` is the twin: a plain loop over the adapters' row groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: Up to this many (token × adapter slot) pairs, all adapters are applied to every token and masked.
MASKED_PATH_MAX_PAIRS = 4096


@dataclass(frozen=True)
class StackedLora:
    """One layer's adapters, stacked for a mixed batch.

    Attributes:
        lora_A: (slots, in_features, r): each adapter's Aᵀ; slot 0 is zeros (rows without an adapter).
        lora_B: (slots, r, out_features): each adapter's s·Bᵀ (the scaling folded in). Both are stored
            transposed so that the per-row matmuls read contiguous (K, N) matrices: ``bmm`` copies
            transposed operands one batch entry at a time.
        row_slot: (batch,) the slot of each row.
        all_A: (in_features, n·r): the n adapters' A side by side (slot 0 left out), for few tokens.
        all_B: (n·r, out_features): their B likewise (row-major K x N: small matmuls are faster so).
        row_columns: (batch, 1, n·r): 1 where a column of ``all_A`` belongs to the row's adapter, else 0
            (all 0 for a row without one).
    """

    lora_A: Tensor
    lora_B: Tensor
    row_slot: Tensor
    all_A: Tensor
    all_B: Tensor
    row_columns: Tensor


def stack_lora(
    factors: Sequence[tuple[Tensor, Tensor, float]], rows: Sequence[Tensor], batch_size: int
) -> StackedLora:
    """Stack ``(A, B, scaling)`` per adapter, the k-th used by the rows in ``rows[k]``.

    Args:
        factors: per adapter, A (r_k, in) and B (out, r_k) of one dtype and device, and its scaling.
        rows: per adapter, a long tensor of the row indices it serves (disjoint).
        batch_size: rows in the batch; rows in no group get slot 0 (no adapter).

    Raises:
        ValueError: no adapters, or ``factors`` and ``rows`` of different lengths.
    """
    if not factors or len(factors) != len(rows):
        raise ValueError(f"need one row group per adapter, got {len(factors)} adapters, {len(rows)} groups")
    first_A, first_B, _ = factors[0]
    rank = max(A.shape[0] for A, _, _ in factors)
    slots = len(factors) + 1
    kwargs = {"dtype": first_A.dtype, "device": first_A.device}
    stacked_A = torch.zeros(slots, first_A.shape[1], rank, **kwargs)  # (slots, in, r)
    stacked_B = torch.zeros(slots, rank, first_B.shape[0], **kwargs)  # (slots, r, out)
    row_slot = torch.zeros(batch_size, dtype=torch.long, device=first_A.device)
    for slot, ((lora_A, lora_B, scaling), indices) in enumerate(zip(factors, rows, strict=True), start=1):
        stacked_A[slot, :, : lora_A.shape[0]] = lora_A.T
        stacked_B[slot, : lora_B.shape[1]] = lora_B.T * scaling
        row_slot[indices.to(row_slot.device)] = slot
    # Side-by-side copies for the few-token path, made once per model call.
    all_A = stacked_A[1:].permute(1, 0, 2).reshape(first_A.shape[1], (slots - 1) * rank)  # (in, n·r)
    all_B = stacked_B[1:].reshape((slots - 1) * rank, -1)  # (n·r, out)
    row_onehot = F.one_hot(row_slot, slots)[:, 1:].to(first_A.dtype)  # (batch, n)
    row_columns = row_onehot.repeat_interleave(rank, dim=1).unsqueeze(1)  # (batch, 1, n·r)
    return StackedLora(stacked_A, stacked_B, row_slot, all_A, all_B, row_columns)


def multi_lora(x: Tensor, base_output: Tensor, stacked: StackedLora, in_place: bool = False) -> Tensor:
    """``base_output`` plus each row's own LoRA update.

    Args:
        x: (batch, ..., in_features), the base layer's input.
        base_output: (batch, ..., out_features).
        stacked: from :func:`stack_lora` for this batch.
        in_place: add the updates into ``base_output`` itself (when it is contiguous and of the
            adapters' dtype) instead of a copy: for a fresh base output that nothing else holds.

    Returns:
        (batch, ..., out_features) in ``base_output``'s dtype.
    """
    slots, in_features, _ = stacked.lora_A.shape
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, in_features).to(stacked.lora_A.dtype)  # (batch, tokens, in)
    tokens = x3.shape[1]
    out_features = base_output.shape[-1]
    fused = base_output.dtype == stacked.lora_A.dtype
    in_place = in_place and fused and base_output.is_contiguous()
    if batch * tokens * slots <= MASKED_PATH_MAX_PAIRS:  # few ops: decoding runs this per layer and token
        h2 = torch.mm(x3.reshape(batch * tokens, in_features), stacked.all_A)  # (batch·tokens, n·r)
        h2.view(batch, tokens, -1).mul_(stacked.row_columns)  # other adapters' columns to zero
        base2 = base_output.reshape(batch * tokens, out_features)
        if in_place:
            base2.addmm_(h2, stacked.all_B)
            return base_output
        if fused:
            return torch.addmm(base2, h2, stacked.all_B).view(base_output.shape)
        delta = h2 @ stacked.all_B  # (batch·tokens, out)
    else:
        row_A = stacked.lora_A.index_select(0, stacked.row_slot)  # (batch, in, r)
        row_B = stacked.lora_B.index_select(0, stacked.row_slot)  # (batch, r, out)
        base3 = base_output.reshape(batch, tokens, out_features)
        h = torch.bmm(x3, row_A)  # (batch, tokens, r)
        if in_place:
            base3.baddbmm_(h, row_B)
            return base_output
        if fused:
            return torch.baddbmm(base3, h, row_B).view(base_output.shape)
        delta = torch.bmm(h, row_B)  # (batch, tokens, out)
    return base_output + delta.view(base_output.shape).to(base_output.dtype)


def multi_lora_reference(
    x: Tensor, base_output: Tensor, factors: Sequence[tuple[Tensor, Tensor, float]], rows: Sequence[Tensor]
) -> Tensor:
    """The twin of :func:`multi_lora`: each adapter applied to its own rows in a loop."""
    out = base_output.clone()
    for (lora_A, lora_B, scaling), indices in zip(factors, rows, strict=True):
        x_rows = x.index_select(0, indices).to(lora_A.dtype)
        update = (x_rows @ lora_A.T @ lora_B.T) * scaling
        out.index_copy_(0, indices, base_output.index_select(0, indices) + update.to(out.dtype))
    return out
