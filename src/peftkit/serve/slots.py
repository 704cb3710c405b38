"""The bank's device tier: a fixed number of slots, each holding one adapter in every layer it adapts.

Every linear layer of the served model is wrapped once, at start-up, in a
:class:`~peftkit.core.layer.AdapterLayer` whose ``route`` is a :class:`SlotRoute`: the layer's LoRA
adapters side by side (:class:`~peftkit.ops.multi_lora.LoraStacks`, made when an adapter first
reaches the layer; slot k at the same place in every layer) and its other adapters' modules by slot.
For one forward the host puts the batch's row → slot mapping (:class:`~peftkit.ops.multi_lora.RowSlots`)
into the shared :class:`BatchContext`; each layer reads it. Slot contents are written in place, on the
engine's thread between forwards, so nothing caches them.
"""

from __future__ import annotations

from torch import Tensor, nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.targeting import adaptable_modules
from peftkit.foundation.modules import is_conv1d
from peftkit.ops.multi_lora import LoraStacks, RowSlots, multi_lora
from peftkit.serve.resident import ResidentAdapter

__all__ = ["BatchContext", "SlotRoute", "SlotTable"]

GROWN_RANK_MINIMUM = 8  # without --max-rank the stacks' rank grows to the next power of two from here


class BatchContext:
    """The row → slot mapping of the forward running now (None between forwards)."""

    def __init__(self) -> None:
        self.rows: RowSlots | None = None


class SlotRoute:
    """One served layer's adapters by slot; called by its wrapper as ``route(layer, x, base_output)``."""

    def __init__(self, context: BatchContext) -> None:
        self.context = context
        self.stacks: LoraStacks | None = None
        self.modules: dict[int, nn.Module] = {}

    def __call__(self, layer: AdapterLayer, x: Tensor, base_output: Tensor) -> Tensor:
        """x: (batch, ..., in); base_output: (batch, ..., out) → each row with its slot's update."""
        rows = self.context.rows
        if rows is None or not rows.adapted:
            return base_output
        y = base_output
        if self.stacks is not None:  # rows of the modules' slots have zeros here
            y = multi_lora(x, y, self.stacks, rows, in_place=True)
        for slot, module in self.modules.items():
            index = rows.rows_of(slot)
            if index.numel():
                adapted = module(layer.base, x.index_select(0, index), y.index_select(0, index))
                y = y.index_copy(0, index, adapted)
        return y


class SlotTable:
    """The slots over a model's wrapped linear layers; see the module docstring.

    Args:
        model: the served model; its linear layers are wrapped here.
        context: where the host puts each forward's row → slot mapping.
        slots: the number of slots (``--max-adapters``); None: a slot is added whenever all are taken.
        rank: the stacks' rank (``--max-rank``); None: grown to fit the largest adapter placed.

    Attributes:
        names: per slot (index 1 … slots; 0 is "no adapter"), the adapter it holds, or None.
        version: counts changes to what the slots hold or their layout.
    """

    def __init__(self, model: nn.Module, context: BatchContext, slots: int | None, rank: int | None) -> None:
        self.routes = _wrap_linear_layers(model, context)
        self.limit = slots
        self.rank = rank or GROWN_RANK_MINIMUM
        self._fixed_rank = rank is not None
        self.names: list[str | None] = [None] * ((slots or 0) + 1)
        self._written: list[set[str]] = [set() for _ in self.names]  # per slot: the layers it wrote
        self.version = 0

    @property
    def count(self) -> int:
        """Slots now (without slot 0)."""
        return len(self.names) - 1

    def slot_of(self, name: str) -> int | None:
        """The slot holding adapter ``name``, or None."""
        return self.names.index(name) if name in self.names else None

    def add_slot(self) -> int | None:
        """A new empty slot, or None at the limit."""
        if self.limit is not None and self.count >= self.limit:
            return None
        self.names.append(None)
        self._written.append(set())
        self._relayout(self.rank)
        return self.count

    def write(self, slot: int, adapter: ResidentAdapter) -> None:
        """Put ``adapter`` into ``slot`` in every layer it adapts, and nothing of the slot's last adapter."""
        if adapter.rank > self.rank:
            if self._fixed_rank:
                raise ValueError(f"adapter rank {adapter.rank} above the slots' {self.rank}")
            self._relayout(max(GROWN_RANK_MINIMUM, 1 << (adapter.rank - 1).bit_length()))
        self.clear(slot)
        for path, update in adapter.layers.items():
            route = self.routes[path]
            if update.factors is not None:
                A, B, scaling = update.factors
                if route.stacks is None:
                    out_features, in_features = B.shape[0], A.shape[1]
                    route.stacks = LoraStacks(
                        self.count + 1, self.rank, in_features, out_features, A.dtype, A.device
                    )
                route.stacks.write(slot, A.to(route.stacks.dtype), B.to(route.stacks.dtype), scaling)
            else:
                route.modules[slot] = update.module
            self._written[slot].add(path)
        self.names[slot] = adapter.name
        self.version += 1

    def forget(self, slot: int) -> None:
        """Mark ``slot`` empty without touching its tensors (for any thread: no request routes to an empty
        slot, and the next :meth:`write` clears it)."""
        self.names[slot] = None
        self.version += 1

    def clear(self, slot: int) -> None:
        """Empty ``slot``: its layers get zeros (LoRA) or lose its module (on the engine's thread)."""
        for path in self._written[slot]:
            route = self.routes[path]
            route.modules.pop(slot, None)
            if route.stacks is not None:
                route.stacks.clear(slot)
        self._written[slot] = set()
        self.names[slot] = None
        self.version += 1

    def _relayout(self, rank: int) -> None:
        """Give every allocated stack room for all slots at ``rank``, keeping what they hold."""
        self.rank = rank
        for route in self.routes.values():
            if route.stacks is not None:
                route.stacks = route.stacks.resized(self.count + 1, rank)
        self.version += 1


def _wrap_linear_layers(model: nn.Module, context: BatchContext) -> dict[str, SlotRoute]:
    """Wrap every ``nn.Linear`` (and transformers' ``Conv1D``) of ``model`` in an ``AdapterLayer`` routed
    by its own :class:`SlotRoute`; the routes by module path."""
    routes = {}
    linear = [name for name, m in adaptable_modules(model) if isinstance(m, nn.Linear) or is_conv1d(m)]
    for path in linear:
        module = model.get_submodule(path)
        layer = module if isinstance(module, AdapterLayer) else AdapterLayer(module)
        layer.route = routes[path] = SlotRoute(context)
        model.set_submodule(path, layer)
    return routes
