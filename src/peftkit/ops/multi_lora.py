"""Many LoRA adapters in one batch: every row gets its own adapter in two batched matmuls per layer.

A layer's adapters sit side by side in :class:`LoraStacks` (slot k's Aᵀ in columns ``k·rank …
(k+1)·rank`` of one matrix, its s·Bᵀ in the same rows of another; slot 0 is zeros: "no adapter";
ranks are zero-padded to the stacks' rank). Which slot each row of a batch uses is plain metadata,
:class:`RowSlots`, made once per batch and shared by every layer. :func:`multi_lora` then computes
``y + s_k·B_k·A_k·x`` for every row with its own ``k``:

- few tokens per row (decoding steps; see :func:`masked_path_applies`): one matmul against the used
  slots' A columns side by side, the other slots' columns zeroed per row, then one matmul against
  their B rows. Each adapter's weights are read once, nothing is copied, and the number of kernels
  does not grow with the number of adapters.
- many tokens per row (prompts, scoring): each row's A and B are gathered (a copy of r·(in + out)
  values per row) and applied with ``bmm``; the arithmetic is that of a single adapter.

:func:`multi_lora_reference` is the twin: a plain loop over the adapters' row groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LoraStacks", "RowSlots", "masked_path_applies", "multi_lora", "multi_lora_reference"]

#: The masked path applies every adapter in the rows' span to every token: per row, tokens × (adapters
#: − 1) rank-r products wasted. It stays the faster path up to about this much waste, and for one token
#: per row at any size (``python benchmarks/multi_lora_paths.py --threads 1``; the crossover is in
#: docs/benchmarks.md, "Mixed batches: the two paths of ops/multi_lora").
MASKED_PATH_MAX_WASTE = 6


def masked_path_applies(tokens: int, adapters: int) -> bool:
    """Whether :func:`multi_lora` applies all ``adapters`` to each of a row's ``tokens`` and masks
    (decoding steps), rather than gathering each row's own A and B (prompts)."""
    return tokens == 1 or tokens * (adapters - 1) <= MASKED_PATH_MAX_WASTE


class LoraStacks:
    """One layer's adapters side by side, in fixed slots; slot 0 is zeros ("no adapter").

    Attributes:
        A: (in_features, slots · rank): slot k's Aᵀ in columns ``k·rank … k·rank + r_k``, zeros after.
        B: (slots · rank, out_features): slot k's s_k·Bᵀ in the same rows.
        slots, rank, in_features, out_features, dtype, device: of the two matrices.
    """

    def __init__(
        self,
        slots: int,
        rank: int,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        if slots < 1 or rank < 1:
            raise ValueError(f"need at least one slot and rank 1, got slots={slots}, rank={rank}")
        self.slots, self.rank = slots, rank
        self.in_features, self.out_features = in_features, out_features
        self.A = torch.zeros(in_features, slots * rank, dtype=dtype, device=device)
        self.B = torch.zeros(slots * rank, out_features, dtype=dtype, device=device)
        self.dtype, self.device = self.A.dtype, self.A.device

    @classmethod
    def from_factors(cls, factors: Sequence[tuple[Tensor, Tensor, float]]) -> LoraStacks:
        """``factors[k]`` (A (r_k, in), B (out, r_k), scaling s_k; one dtype and device) in slot k + 1.

        Raises:
            ValueError: no factors.
        """
        if not factors:
            raise ValueError("need at least one adapter to stack")
        first_A, first_B, _ = factors[0]
        rank = max(A.shape[0] for A, _, _ in factors)
        in_features, out_features = first_A.shape[1], first_B.shape[0]
        stacks = cls(len(factors) + 1, rank, in_features, out_features, first_A.dtype, first_A.device)
        for slot, (lora_A, lora_B, scaling) in enumerate(factors, start=1):
            stacks.write(slot, lora_A, lora_B, scaling)
        return stacks

    def write(self, slot: int, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        """Put one adapter into ``slot`` (1 … slots − 1), replacing what was there.

        Args:
            lora_A: (r, in_features) with r ≤ rank.
            lora_B: (out_features, r).
            scaling: s, folded into B.
        """
        r = lora_A.shape[0]
        if not 0 < slot < self.slots or r > self.rank:
            raise ValueError(f"slot {slot} of 1..{self.slots - 1}, rank {r} of at most {self.rank}")
        self.clear(slot)
        start = slot * self.rank
        with torch.no_grad():
            self.A[:, start : start + r] = lora_A.detach().T
            self.B[start : start + r] = lora_B.detach().T * scaling

    def clear(self, slot: int) -> None:
        """Zero ``slot``: rows routed to it get no update from this layer."""
        columns = slice(slot * self.rank, (slot + 1) * self.rank)
        with torch.no_grad():
            self.A[:, columns] = 0
            self.B[columns] = 0

    def resized(self, slots: int, rank: int) -> LoraStacks:
        """A copy with room for ``slots`` slots of ``rank`` (each at least the current), contents kept."""
        grown = LoraStacks(slots, rank, self.in_features, self.out_features, self.dtype, self.device)
        with torch.no_grad():
            grown.A.view(self.in_features, slots, rank)[:, : self.slots, : self.rank] = self.A.view(
                self.in_features, self.slots, self.rank
            )
            grown.B.view(slots, rank, self.out_features)[: self.slots, : self.rank] = self.B.view(
                self.slots, self.rank, self.out_features
            )
        return grown

    def per_row(self, row_slot: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's own Aᵀ (batch, in, rank) and s·Bᵀ (batch, rank, out), gathered (copies)."""
        by_slot_A = self.A.view(self.in_features, self.slots, self.rank).permute(1, 0, 2)  # (slots, in, r)
        by_slot_B = self.B.view(self.slots, self.rank, self.out_features)  # (slots, r, out)
        return by_slot_A.index_select(0, row_slot), by_slot_B.index_select(0, row_slot)


class RowSlots:
    """Which slot each row of a batch uses (0: no adapter), made once per batch for all its layers.

    The few-token path's column masks depend only on the rows' slots and the stacks' rank, so the
    layers of a batch share them (built by the first layer that needs one).

    Attributes:
        slot: (batch,) long.
        first, stop: the slots the rows use lie in ``range(first, stop)`` (empty when none is used);
            the few-token path reads only those (one request alone reads its own adapter).
    """

    def __init__(self, slots: Sequence[int], device: torch.device | str | None = None) -> None:
        self.slot = torch.tensor(list(slots), dtype=torch.long, device=device)
        used = [slot for slot in slots if slot > 0]
        self.first, self.stop = (min(used), max(used) + 1) if used else (0, 0)
        self._masks: dict[tuple[int, torch.dtype], Tensor] = {}
        self._rows: dict[int, Tensor] = {}

    @classmethod
    def from_groups(
        cls, groups: Sequence[Tensor], batch_size: int, device: torch.device | str | None = None
    ) -> RowSlots:
        """k + 1 for the rows in ``groups[k]`` (long index tensors, disjoint), 0 for rows in none."""
        slots = [0] * batch_size
        for slot, rows in enumerate(groups, start=1):
            for row in rows.tolist():
                slots[row] = slot
        return cls(slots, device)

    @property
    def adapted(self) -> bool:
        """Whether any row uses a slot."""
        return self.stop > self.first

    def column_mask(self, rank: int, dtype: torch.dtype) -> Tensor:
        """(batch, 1, (stop − first)·rank): 1 on each row's own slot's columns, 0 elsewhere."""
        key = (rank, dtype)
        if key not in self._masks:
            onehot = F.one_hot(self.slot, max(self.stop, 1))[:, self.first : self.stop]  # (batch, n)
            onehot = onehot.to(dtype)
            self._masks[key] = onehot.repeat_interleave(rank, dim=1).unsqueeze(1)  # (batch, 1, n·rank)
        return self._masks[key]

    def rows_of(self, slot: int) -> Tensor:
        """The indices of the rows that use ``slot`` (long, possibly empty)."""
        if slot not in self._rows:
            self._rows[slot] = (self.slot == slot).nonzero().flatten()
        return self._rows[slot]


def multi_lora(
    x: Tensor, base_output: Tensor, stacks: LoraStacks, rows: RowSlots, in_place: bool = False
) -> Tensor:
    """``base_output`` plus each row's own LoRA update.

    Args:
        x: (batch, ..., in_features), the base layer's input.
        base_output: (batch, ..., out_features).
        stacks: the layer's adapters.
        rows: each row's slot in ``stacks``.
        in_place: add the updates into ``base_output`` itself (when it is contiguous and of the
            adapters' dtype) instead of a copy: for a fresh base output that nothing else holds.

    Returns:
        (batch, ..., out_features) in ``base_output``'s dtype.
    """
    if not rows.adapted:
        return base_output
    in_features, out_features, rank = stacks.in_features, stacks.out_features, stacks.rank
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, in_features).to(stacks.dtype)  # (batch, tokens, in)
    tokens = x3.shape[1]
    fused = base_output.dtype == stacks.dtype
    in_place = in_place and fused and base_output.is_contiguous()
    if masked_path_applies(tokens, rows.stop - rows.first):  # few ops: decoding runs this per layer
        columns = slice(rows.first * rank, rows.stop * rank)
        all_A, all_B = stacks.A[:, columns], stacks.B[columns]  # views: (in, n·r), (n·r, out)
        h2 = torch.mm(x3.reshape(batch * tokens, in_features), all_A)  # (batch·tokens, n·r)
        h2.view(batch, tokens, -1).mul_(rows.column_mask(rank, stacks.dtype))  # other slots' columns to 0
        base2 = base_output.reshape(batch * tokens, out_features)
        if in_place:
            base2.addmm_(h2, all_B)
            return base_output
        if fused:
            return torch.addmm(base2, h2, all_B).view(base_output.shape)
        delta = h2 @ all_B  # (batch·tokens, out)
    else:
        row_A, row_B = stacks.per_row(rows.slot)  # (batch, in, r), (batch, r, out)
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
