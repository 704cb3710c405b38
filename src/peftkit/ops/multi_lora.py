"""Many LoRA adapters in one batch: every row gets its own adapter in two batched matmuls per layer.

A layer's adapters are stacked (:class:`AdapterStacks`, each layout on first use; the same stacks
serve every batch that uses the same adapters): slot 0 is "no adapter" (zeros), ranks are
zero-padded to the largest, and each adapter's scaling is folded into its B. :func:`stack_lora` adds
which rows use which slot.
:func:`multi_lora` then computes ``y + s_k·B_k·A_k·x`` for every row with its own ``k``:

- few tokens per row (``generate``'s decoding steps; see :func:`masked_path_applies`): one matmul
  against all adapters' A rows side by side, the other adapters' columns zeroed per row, then one
  matmul against all B columns. Each adapter's weights are read once, nothing is copied, and the
  number of kernels does not grow with the number of adapters.
- many tokens per row (prompts, scoring): each row's A and B are gathered (a copy of r·(in + out)
  values per row) and applied with ``bmm``; the arithmetic is that of a single adapter.

:func:`multi_lora_reference` is the twin: a plain loop over the adapters' row groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: The masked path applies every adapter in the rows' span to every token: per row, tokens × (adapters
#: − 1) rank-r products wasted. With several tokens per row it is faster than gathering each row's A
#: and B up to this many (``python benchmarks/multi_lora_paths.py --threads 1``: at SmolLM2's shapes,
#: r16, the two paths cross between 4 and 8 for 2, 4, 8 and 16 adapters); with one token per row (a
#: decoding step) it was faster at every size measured, up to 16 adapters over 16 rows.
MASKED_PATH_MAX_WASTE = 6


def masked_path_applies(tokens: int, adapters: int) -> bool:
    """Whether :func:`multi_lora` applies all ``adapters`` to each of a row's ``tokens`` and masks
    (decoding steps), rather than gathering each row's own A and B (prompts)."""
    return tokens == 1 or tokens * (adapters - 1) <= MASKED_PATH_MAX_WASTE


class AdapterStacks:
    """One layer's adapters stacked, whichever rows use them; each layout is built on first use.

    Slot 0 is "no adapter"; adapter k (in the order given) is slot k + 1.

    Attributes:
        slots: adapters + 1.
        rank, in_features, out_features, dtype: of the stacks (ranks zero-padded to the largest).
    """

    def __init__(self, factors: Sequence[tuple[Tensor, Tensor, float]]) -> None:
        if not factors:
            raise ValueError("need at least one adapter to stack")
        self._factors = list(factors)
        first_A, first_B, _ = factors[0]
        self.dtype = first_A.dtype
        self.device = first_A.device
        self._like = {"dtype": first_A.dtype, "device": first_A.device}
        self.rank = max(A.shape[0] for A, _, _ in factors)
        self.in_features, self.out_features = first_A.shape[1], first_B.shape[0]
        self.slots = len(factors) + 1
        self._per_row: tuple[Tensor, Tensor] | None = None
        self._side_by_side: tuple[Tensor, Tensor] | None = None

    def per_row(self) -> tuple[Tensor, Tensor]:
        """(slots, in, r) of Aᵀ and (slots, r, out) of s·Bᵀ, slot 0 zeros, for the many-token path.

        Transposed so that the per-row matmuls read contiguous (K, N) matrices: ``bmm`` copies
        transposed operands one batch entry at a time.
        """
        if self._per_row is None:
            stacked_A = torch.zeros(self.slots, self.in_features, self.rank, **self._like)
            stacked_B = torch.zeros(self.slots, self.rank, self.out_features, **self._like)
            for slot, (lora_A, lora_B, scaling) in enumerate(self._factors, start=1):
                stacked_A[slot, :, : lora_A.shape[0]] = lora_A.T
                stacked_B[slot, : lora_B.shape[1]] = lora_B.T * scaling
            self._per_row = stacked_A, stacked_B
        return self._per_row

    def side_by_side(self) -> tuple[Tensor, Tensor]:
        """For the few-token path: all adapters' Aᵀ side by side (in, n·r) and their s·Bᵀ stacked
        (n·r, out), row-major K x N as small matmuls like them."""
        if self._side_by_side is None:
            width = (self.slots - 1) * self.rank
            all_A = torch.zeros(self.in_features, width, **self._like)
            all_B = torch.zeros(width, self.out_features, **self._like)
            for index, (lora_A, lora_B, scaling) in enumerate(self._factors):
                start = index * self.rank
                all_A[:, start : start + lora_A.shape[0]] = lora_A.T
                all_B[start : start + lora_B.shape[1]] = lora_B.T * scaling
            self._side_by_side = all_A, all_B
        return self._side_by_side


class StackedLora:
    """One layer's adapters for one batch: the :class:`AdapterStacks` (shareable between batches that
    use the same adapters) and which slot each row uses.

    The column masks of the few-token path depend only on the row slots and the rank, so a batch's
    layers share them through ``shared`` (a dict the batch owns): built once per batch, not per layer.

    Attributes:
        stacks: the adapters' stacks.
        row_slot: (batch,) the slot of each row (0: no adapter).
    """

    def __init__(
        self, stacks: AdapterStacks, row_slot: Tensor, shared: dict[Any, Tensor] | None = None
    ) -> None:
        self.stacks = stacks
        self.dtype, self.rank, self.slots = stacks.dtype, stacks.rank, stacks.slots
        self.in_features, self.out_features = stacks.in_features, stacks.out_features
        self.row_slot = row_slot
        self._shared = shared if shared is not None else {}
        self._used: tuple[int, int] | None = None
        self._side_by_side: tuple[Tensor, Tensor, Tensor] | None = None

    def per_row(self) -> tuple[Tensor, Tensor]:
        """See :meth:`AdapterStacks.per_row`."""
        return self.stacks.per_row()

    def used_adapters(self) -> tuple[int, int]:
        """``(first, stop)``: the adapters (0-based, slot − 1) the rows use lie in ``range(first, stop)``;
        the few-token path reads only those (one request alone reads its own adapter only)."""
        if self._used is None:
            key = ("used", id(self.row_slot))
            if key not in self._shared:
                used = self.row_slot[self.row_slot > 0]
                first, last = (int(used.min()), int(used.max())) if used.numel() else (1, 0)
                self._shared[key] = (first - 1, last)
                self._shared[("row_slot", *key)] = self.row_slot  # kept: ids keyed here stay its
            self._used = self._shared[key]
        return self._used

    def side_by_side(self) -> tuple[Tensor, Tensor, Tensor]:
        """The used adapters' (see :meth:`used_adapters`) part of :meth:`AdapterStacks.side_by_side`
        (views, no copies), and per row a (batch, 1, columns) mask of 1 on its adapter's columns (all
        0 for a row without one); made on the first call, which every decoding step then reuses."""
        if self._side_by_side is None:
            all_A, all_B = self.stacks.side_by_side()
            first, stop = self.used_adapters()
            columns = slice(first * self.rank, stop * self.rank)
            key = (id(self.row_slot), self.slots, self.rank, all_A.dtype)
            if key not in self._shared:
                onehot = F.one_hot(self.row_slot, self.slots)[:, 1:].to(all_A.dtype)  # (batch, n)
                mask = onehot.repeat_interleave(self.rank, dim=1).unsqueeze(1)  # (batch, 1, n·r)
                self._shared[key] = mask[:, :, columns]
            self._side_by_side = all_A[:, columns], all_B[columns], self._shared[key]
        return self._side_by_side


def row_slots(rows: Sequence[Tensor], batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """(batch_size,) long: k + 1 for the rows in ``rows[k]``, 0 for rows in none."""
    slots = torch.zeros(batch_size, dtype=torch.long, device=device)
    for slot, indices in enumerate(rows, start=1):
        slots[indices.to(slots.device)] = slot
    return slots


def stack_lora(
    factors: Sequence[tuple[Tensor, Tensor, float]],
    rows: Sequence[Tensor],
    batch_size: int,
    stacks: AdapterStacks | None = None,
) -> StackedLora:
    """Stack ``(A, B, scaling)`` per adapter, the k-th used by the rows in ``rows[k]``.

    Args:
        factors: per adapter, A (r_k, in) and B (out, r_k) of one dtype and device, and its scaling.
        rows: per adapter, a long tensor of the row indices it serves (disjoint; may be empty).
        batch_size: rows in the batch; rows in no group get slot 0 (no adapter).
        stacks: ``AdapterStacks(factors)`` made before (for another batch of the same adapters), reused.

    Raises:
        ValueError: no adapters, or ``factors`` and ``rows`` of different lengths.
    """
    if not factors or len(factors) != len(rows):
        raise ValueError(f"need one row group per adapter, got {len(factors)} adapters, {len(rows)} groups")
    stacks = stacks if stacks is not None else AdapterStacks(factors)
    return StackedLora(stacks, row_slots(rows, batch_size, stacks.device))


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
    in_features, out_features = stacked.in_features, stacked.out_features
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, in_features).to(stacked.dtype)  # (batch, tokens, in)
    tokens = x3.shape[1]
    fused = base_output.dtype == stacked.dtype
    in_place = in_place and fused and base_output.is_contiguous()
    first, stop = stacked.used_adapters()
    if masked_path_applies(tokens, stop - first):  # few ops: decoding runs this per layer and token
        all_A, all_B, row_columns = stacked.side_by_side()
        h2 = torch.mm(x3.reshape(batch * tokens, in_features), all_A)  # (batch·tokens, n·r)
        h2.view(batch, tokens, -1).mul_(row_columns)  # other adapters' columns to zero
        base2 = base_output.reshape(batch * tokens, out_features)
        if in_place:
            base2.addmm_(h2, all_B)
            return base_output
        if fused:
            return torch.addmm(base2, h2, all_B).view(base_output.shape)
        delta = h2 @ all_B  # (batch·tokens, out)
    else:
        stacked_A, stacked_B = stacked.per_row()
        row_A = stacked_A.index_select(0, stacked.row_slot)  # (batch, in, r)
        row_B = stacked_B.index_select(0, stacked.row_slot)  # (batch, r, out)
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
