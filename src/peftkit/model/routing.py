"""Mixed batches: one adapter name per row, handed to the wrappers as a function for a call.

:class:`Routing` groups the rows by adapter once. While it is set (``PeftModel.forward`` /
``generate`` with ``adapter_names``), every :class:`~peftkit.core.layer.AdapterLayer` calls
:meth:`Routing.adapter_layer`: where no gradient is needed, the layer's plain-LoRA adapters are
stacked on the first call (:class:`~peftkit.ops.multi_lora.LoraStacks`, kept by the routing, so a
``generate`` stacks once for all its steps) and all their rows are done in two batched matmuls; any
other adapter (DoRA, IA³, bottleneck…, or all of them when gradients flow) is applied to its own rows
by gathering them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from peftkit.core.layer import BASE_ADAPTER_NAME, AdapterLayer, ModulesToSave
from peftkit.ops.multi_lora import LoraStacks, RowSlots, multi_lora

__all__ = ["Routing"]


class Routing:
    """Which rows of a batch use which adapter; the wrappers' ``route`` functions for such a batch.

    Valid while the model's adapters stay as they were when it was first used: a layer's stacks are
    copies, made on its first call.

    Args:
        adapter_names: one name per row (``"__base__"``: no adapter).
        device: where the row indices live (the model's device).

    Attributes:
        batch_size: the number of rows.
        groups: ``{adapter name: row indices (long)}``; rows routed to ``"__base__"`` are in none.
    """

    def __init__(self, adapter_names: Sequence[str], device: torch.device | str | None = None) -> None:
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            rows.setdefault(name, []).append(row)
        self.batch_size = len(adapter_names)
        self.device = device
        self.groups = {
            name: torch.tensor(indices, dtype=torch.long, device=device)
            for name, indices in rows.items()
            if name != BASE_ADAPTER_NAME
        }
        # per layer (by id): the stacked names, their stacks, whether one of them trains; None: no stacks
        self._stacks: dict[int, tuple[tuple[str, ...], LoraStacks, bool] | None] = {}
        self._row_slots: dict[tuple[str, ...], RowSlots] = {}  # per tuple of stacked names

    def adapter_layer(self, layer: AdapterLayer, x: Tensor, base_output: Tensor) -> Tensor:
        """The routed output of ``layer`` (see :data:`~peftkit.core.layer.LayerRoute`).

        x: (batch, ..., in); base_output: (batch, ..., out) → (batch, ..., out).
        """
        self._check_batch(x)
        used = [name for name in self.groups if name in layer.adapters]
        if not used:
            return base_output
        graph = torch.is_grad_enabled() and (x.requires_grad or base_output.requires_grad)
        stacked = None if graph else self._stacked(layer)
        y = base_output
        if stacked is not None:  # y is the base layer's fresh output: updated in place
            names, stacks = stacked
            y = multi_lora(x, y, stacks, self._slots(names), in_place=True)
            used = [name for name in used if name not in names]
        if used:
            y = y.clone()
            for name in used:
                rows = self.groups[name]
                adapted = layer.adapters[name](layer.base, x.index_select(0, rows), y.index_select(0, rows))
                y.index_copy_(0, rows, adapted)
        return y

    def modules_to_save(self, wrapper: ModulesToSave, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """The routed output of a ``modules_to_save`` wrapper: each group's rows through its own copy."""
        self._check_batch(x)
        out = wrapper.original(x, *args, **kwargs).clone()
        for name, rows in self.groups.items():
            if name in wrapper.copies:
                out.index_copy_(0, rows, wrapper.copies[name](x.index_select(0, rows), *args, **kwargs))
        return out

    def _stacked(self, layer: AdapterLayer) -> tuple[tuple[str, ...], LoraStacks] | None:
        """The names and stacks of the layer's plain-LoRA adapters this routing uses (made on first
        use), or None when none of them stacks, or when one trains and gradients are on (stacks are
        copies: they would cut its gradient)."""
        if id(layer) not in self._stacks:
            factors = {}
            for name in [name for name in self.groups if name in layer.adapters]:
                found = getattr(layer.adapters[name], "low_rank_factors", lambda: None)()
                if found is not None and name not in layer.merged_adapters:
                    factors[name] = found
            trained = any(A.requires_grad or B.requires_grad for A, B, _ in factors.values())
            one_kind = len({(A.dtype, A.device) for A, _, _ in factors.values()}) == 1
            stacks = LoraStacks.from_factors(list(factors.values())) if one_kind else None
            self._stacks[id(layer)] = (tuple(factors), stacks, trained) if stacks is not None else None
        found = self._stacks[id(layer)]
        if found is None or (found[2] and torch.is_grad_enabled()):
            return None
        return found[0], found[1]

    def _slots(self, names: tuple[str, ...]) -> RowSlots:
        """Each row's slot among ``names`` (k + 1 for the k-th), shared by the layers stacking those."""
        if names not in self._row_slots:
            groups = [self.groups[name] for name in names]
            self._row_slots[names] = RowSlots.from_groups(groups, self.batch_size, self.device)
        return self._row_slots[names]

    def _check_batch(self, x: Tensor) -> None:
        if x.shape[0] != self.batch_size:
            raise ValueError(
                f"adapter_names has {self.batch_size} entries but this layer sees a batch of "
                f"{x.shape[0]} rows; pass one adapter name per row of the input"
            )
