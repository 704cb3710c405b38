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
        lora_A: (slots, r, in_features); slot 0 is zeros (rows without an adapter).
        lora_B: (slots, out_features, r), each adapter's scaling folded in.
        row_slot: (batch,) the slot of each row.
        row_onehot: (batch, slots) the same as a one-hot float mask in the adapters' dtype.
    """

    lora_A: Tensor
    lora_B: Tensor
    row_slot: Tensor
    row_onehot: Tensor


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
    stacked_A = torch.zeros(slots, rank, first_A.shape[1], **kwargs)  # (slots, r, in)
    stacked_B = torch.zeros(slots, first_B.shape[0], rank, **kwargs)  # (slots, out, r)
    row_slot = torch.zeros(batch_size, dtype=torch.long, device=first_A.device)
    for slot, ((lora_A, lora_B, scaling), indices) in enumerate(zip(factors, rows, strict=True), start=1):
        stacked_A[slot, : lora_A.shape[0]] = lora_A
        stacked_B[slot, :, : lora_B.shape[1]] = lora_B * scaling
        row_slot[indices.to(row_slot.device)] = slot
    row_onehot = F.one_hot(row_slot, slots).to(first_A.dtype)  # (batch, slots)
    return StackedLora(stacked_A, stacked_B, row_slot, row_onehot)


def multi_lora(x: Tensor, base_output: Tensor, stacked: StackedLora) -> Tensor:
    """``base_output`` plus each row's own LoRA update.

    Args:
        x: (batch, ..., in_features), the base layer's input.
        base_output: (batch, ..., out_features).
        stacked: from :func:`stack_lora` for this batch.

    Returns:
        (batch, ..., out_features) in ``base_output``'s dtype.
    """
    slots, rank, in_features = stacked.lora_A.shape
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, in_features).to(stacked.lora_A.dtype)  # (batch, tokens, in)
    tokens = x3.shape[1]
    out_features = base_output.shape[-1]
    if batch * tokens * slots <= MASKED_PATH_MAX_PAIRS:
        h = x3 @ stacked.lora_A.reshape(slots * rank, in_features).T  # (batch, tokens, slots·r)
        h = h.view(batch, tokens, slots, rank) * stacked.row_onehot[:, None, :, None]
        all_B = stacked.lora_B.permute(1, 0, 2).reshape(out_features, slots * rank)  # (out, slots·r)
        delta = h.view(batch, tokens, slots * rank) @ all_B.T  # (batch, tokens, out)
    else:
        row_A = stacked.lora_A.index_select(0, stacked.row_slot)  # (batch, r, in)
        row_B = stacked.lora_B.index_select(0, stacked.row_slot)  # (batch, out, r)
        base3 = base_output.reshape(batch, tokens, out_features)
        h = torch.bmm(x3, row_A.transpose(1, 2))  # (batch, tokens, r)
        if base3.dtype == h.dtype:
            return torch.baddbmm(base3, h, row_B.transpose(1, 2)).view(base_output.shape)
        delta = torch.bmm(h, row_B.transpose(1, 2))  # (batch, tokens, out)
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
