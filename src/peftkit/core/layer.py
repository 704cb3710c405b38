"""The generic wrapped layer: the original module kept as ``base``, plus named adapters.

Every method that works inside layers (LoRA, IA³, bottleneck adapters…) plugs into
:class:`AdapterLayer` through the small :class:`Adapter` protocol. Per-row routing for mixed batches
is computed once per model call (:class:`Routing`) and handed to every layer by the model.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from peftkit.ops.multi_lora import AdapterStacks, StackedLora, multi_lora, row_slots

BASE_ADAPTER_NAME = "__base__"
STACKS_KEPT = 1  # stacks a layer keeps for mixed batches (it stacks all its LoRA adapters: one set)


@runtime_checkable
class Adapter(Protocol):
    """What a method's per-layer adapter provides.

    ``forward`` returns the layer's new output from the input ``x`` and the base output; ``merge`` and
    ``unmerge`` fold the adapter into the base module's weights in place and back. A method that
    cannot be merged raises ``NotImplementedError`` with the reason.

    Optional (looked up with ``getattr``): ``forward_with_base(base, x) -> Tensor | None`` computes the
    layer's whole output, base module included, in one op where that saves work, and returns None where
    it does not apply; the layer then runs the base module and ``forward``. LoRA on a frozen
    ``nn.Linear`` has it.
    """

    def forward(self, base: nn.Module, x: Tensor, base_output: Tensor) -> Tensor: ...

    def merge(self, base: nn.Module, safe: bool = False) -> None: ...

    def unmerge(self, base: nn.Module) -> None: ...


@dataclass(frozen=True)
class Routing:
    """Which rows of a batch use which adapter, grouped once per model call.

    Attributes:
        batch_size: the number of rows the routing was built for.
        groups: ``(adapter name, row indices)`` per adapter; rows routed to ``"__base__"`` are in none.
        stacked: per layer (by ``id``), its LoRA adapters stacked for this call on first use, or None
            where they cannot be; ``generate`` reuses them for every decoding step.
        plans: per layer (by ``id``), what it stacks whatever the rows (:class:`StackPlan`), made on
            first use; :meth:`reroute` hands them to the routing of other rows.
        shared: what the layers' stacks share, built by the first layer that needs it: each row's
            slot per list of stacked adapters (:meth:`row_slot`), its column masks per rank.
        layers: per model (by ``id``), the wrapped layers the routing is set on, found on its first call.
    """

    batch_size: int
    groups: tuple[tuple[str, Tensor], ...]
    stacked: dict[int, StackedLora | None] = field(default_factory=dict, compare=False, repr=False)
    plans: dict[int, StackPlan] = field(default_factory=dict, compare=False, repr=False)
    shared: dict[Any, Tensor] = field(default_factory=dict, compare=False, repr=False)
    layers: dict[int, list[nn.Module]] = field(default_factory=dict, compare=False, repr=False)

    def reroute(self, adapter_names: list[str], device: torch.device | str | None = None) -> Routing:
        """The routing of other rows over the same adapters, taking over this one's per-layer plans and
        layer lists: a server whose rows change every few steps pays the per-layer work once. Valid,
        like this routing, while the adapters do not change."""
        routing = Routing.from_names(adapter_names, device)
        routing.plans.update(self.plans)
        routing.layers.update(self.layers)
        return routing

    @classmethod
    def from_names(cls, adapter_names: list[str], device: torch.device | str | None = None) -> Routing:
        """Group ``adapter_names`` (one per row) into row-index tensors on ``device``."""
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            rows.setdefault(name, []).append(row)
        groups = tuple(
            (name, torch.tensor(indices, dtype=torch.long, device=device))
            for name, indices in rows.items()
            if name != BASE_ADAPTER_NAME
        )
        return cls(batch_size=len(adapter_names), groups=groups)

    def row_slot(self, stacked_names: tuple[str, ...], device: torch.device) -> Tensor:
        """(batch,) long: each row's slot among ``stacked_names`` (k + 1 for the k-th, 0: none of them);
        made once per list of names, shared by the layers that stack those adapters."""
        key = ("row_slot", stacked_names, device)
        if key not in self.shared:
            by_name = dict(self.groups)
            empty = torch.empty(0, dtype=torch.long)
            rows = [by_name.get(name, empty) for name in stacked_names]
            self.shared[key] = row_slots(rows, self.batch_size, device)
        return self.shared[key]


@dataclass(frozen=True)
class StackPlan:
    """What one layer stacks for mixed batches, whatever their rows.

    Attributes:
        names: the stacked adapters, in slot order (slot k + 1 is ``names[k]``).
        stacks: their stacks, or None where they cannot be stacked together (dtype or device differ).
        left_out: the layer's adapters that are not plain LoRA: a batch using one takes the per-group path.
        requires_grad: a stacked factor needs gradients: the stacks (copies) serve only without grad.
    """

    names: tuple[str, ...]
    stacks: AdapterStacks | None
    left_out: tuple[str, ...]
    requires_grad: bool

    def covers(self, adapters: Iterable[str]) -> bool:
        """Whether the plan was made for exactly these adapter names (a routing made ``like=`` an older
        one after an adapter was loaded or deleted gets a new plan; in-place changes are not seen)."""
        return sorted(adapters) == sorted((*self.names, *self.left_out))


class _Wrapper(nn.Module):
    """State shared by peftkit's wrappers, set by the model for all of them at once."""

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.routing: Routing | None = None

    def _check_batch(self, x: Tensor) -> None:
        assert self.routing is not None
        if x.shape[0] != self.routing.batch_size:
            raise ValueError(
                f"adapter_names has {self.routing.batch_size} entries but this layer sees a batch of "
                f"{x.shape[0]} rows; pass one adapter name per row of the input"
            )


class AdapterLayer(_Wrapper):
    """A module wrapped with named adapters: ``y = base(x)``, then each active adapter transforms y.

    Args:
        base: the original module; it is kept unchanged as ``self.base`` and given back on unload.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.merged_adapters: list[str] = []
        # recently stacked adapter sets for mixed batches: (versions, weak refs to A and B, stacks)
        self._stacks: list[tuple[tuple, list, AdapterStacks]] = []

    @property
    def weight(self) -> Tensor:
        """The base module's weight: models that read ``layer.weight`` (T5, tied embeddings) keep working."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        """The base module's bias, or None."""
        return getattr(self.base, "bias", None)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """x: the base module's input, batch first; returns the adapted output, same shape as base's.

        With one adapter in use that can compute the base layer inside its own op
        (``forward_with_base``, see :class:`Adapter`), that runs instead of the base then the adapter.
        """
        if not (args or kwargs or self.disabled) and self.routing is None:
            adapter = self._only_adapter_in_use()
            with_base = getattr(adapter, "forward_with_base", None)
            y = None if with_base is None else with_base(self.base, x)
            if y is not None:
                return y
        y = self.base(x, *args, **kwargs)
        if self.disabled:
            return y
        if self.routing is not None:
            return self._forward_routed(x, y)
        for name in self.active_adapters:
            if name in self.adapters and name not in self.merged_adapters:
                y = self.adapters[name](self.base, x, y)
        return y

    def _only_adapter_in_use(self) -> nn.Module | None:
        """The one active, unmerged adapter this layer has, or None when there are none or several."""
        merged = self.merged_adapters
        in_use = [name for name in self.active_adapters if name in self.adapters and name not in merged]
        return self.adapters[in_use[0]] if len(in_use) == 1 else None

    def _forward_routed(self, x: Tensor, y: Tensor) -> Tensor:
        """Each row group goes through its own adapter; rows of other groups are untouched.

        Where no gradient is needed and every adapter in use is plain LoRA, the adapters are stacked
        once per model call and all rows are done in two batched matmuls (:mod:`peftkit.ops.multi_lora`);
        otherwise each group's rows are gathered, adapted, and written into a copy of ``y``.
        """
        assert self.routing is not None
        self._check_batch(x)
        no_graph = not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))
        stacked = self.routing.stacked.get(id(self)) if no_graph else None
        if stacked is not None:  # the decoding steps of generate: the stacks of the first step, reused
            return multi_lora(x, y, stacked, in_place=True)
        used = [(name, rows) for name, rows in self.routing.groups if name in self.adapters]
        if not used:
            return y
        if no_graph:
            stacked = self._stacked_lora(used)
            if stacked is not None:  # y is the base layer's fresh output: updated in place
                return multi_lora(x, y, stacked, in_place=True)
        out = y.clone()
        for name, rows in used:
            adapted = self.adapters[name](self.base, x.index_select(0, rows), y.index_select(0, rows))
            out.index_copy_(0, rows, adapted)
        return out

    def _stacked_lora(self, used: list[tuple[str, Tensor]]) -> StackedLora | None:
        """This layer's adapters stacked for the current routing (built on first use), or None when an
        adapter in use cannot be stacked or the stacks would cut a gradient (see :class:`StackPlan`)."""
        assert self.routing is not None
        if id(self) not in self.routing.stacked:
            plan = self.routing.plans.get(id(self))
            if plan is None or not plan.covers(self.adapters):  # none yet, or adapters came or went
                plan = self.routing.plans[id(self)] = self._stack_plan()
            stacks = plan.stacks
            if any(name in plan.left_out for name, _ in used) or (
                plan.requires_grad and torch.is_grad_enabled()
            ):
                stacks = None
            self.routing.stacked[id(self)] = (
                None
                if stacks is None
                else StackedLora(
                    stacks, self.routing.row_slot(plan.names, stacks.device), self.routing.shared
                )
            )
        return self.routing.stacked[id(self)]

    def _stack_plan(self) -> StackPlan:
        """Every plain-LoRA adapter of the layer stacked, not only those a batch uses: the stacks then
        stay the same from batch to batch (a server's batches change adapters as requests come and go)
        and are built once; :func:`~peftkit.ops.multi_lora.multi_lora` counts them when it chooses its
        path. No stacks when the factors differ in dtype or device."""
        factors: dict[str, tuple[Tensor, Tensor, float]] = {}
        left_out = []
        for name in sorted(self.adapters):  # the same adapters stack the same way whatever rows use them
            found = getattr(self.adapters[name], "low_rank_factors", lambda: None)()
            if found is None or name in self.merged_adapters:
                left_out.append(name)
            else:
                factors[name] = found
        plain = list(factors.values())
        if not plain or len({(A.dtype, A.device) for A, _, _ in plain}) != 1:
            return StackPlan((), None, tuple(self.adapters), False)
        requires_grad = any(A.requires_grad or B.requires_grad for A, B, _ in plain)
        return StackPlan(tuple(factors), self._stacks_for(plain), tuple(left_out), requires_grad)

    def _stacks_for(self, factors: list[tuple[Tensor, Tensor, float]]) -> AdapterStacks:
        """The stacks of ``factors``, reused from an earlier batch while the adapters' tensors are the
        same objects, unchanged since (their ``_version``): a server whose batch changes rows every few
        steps stacks its adapters once. The last :data:`STACKS_KEPT` are kept; they hold copies, not
        the adapters, so an unloaded adapter's tensors are freed (its stacks go with the next set).
        """
        key = tuple((_version(A), _version(B), scaling) for A, B, scaling in factors)
        if any(None in versions for versions in key):  # inference tensors keep no version: no reuse
            return AdapterStacks(factors)
        for index, (entry_key, refs, stacks) in enumerate(self._stacks):
            if entry_key == key and all(
                ref_A() is A and ref_B() is B for (ref_A, ref_B), (A, B, _) in zip(refs, factors, strict=True)
            ):
                self._stacks.insert(0, self._stacks.pop(index))
                return stacks
        stacks = AdapterStacks(factors)
        refs = [(weakref.ref(A), weakref.ref(B)) for A, B, _ in factors]
        self._stacks.insert(0, (key, refs, stacks))
        del self._stacks[STACKS_KEPT:]
        return stacks

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_stacks"] = []  # weak references do not pickle; the stacks are rebuilt on use
        return state

    def merge(self, names: list[str], safe: bool = False) -> None:
        """Fold the named adapters this layer has into ``base``'s weights, in order."""
        for name in names:
            if name in self.adapters and name not in self.merged_adapters:
                self.adapters[name].merge(self.base, safe=safe)
                self.merged_adapters.append(name)

    def unmerge(self, keep: int = 0) -> None:
        """Take merged adapters back out of ``base``'s weights, last merged first, until ``keep`` remain."""
        while len(self.merged_adapters) > keep:
            self.adapters[self.merged_adapters.pop()].unmerge(self.base)


def _version(tensor: Tensor) -> int | None:
    """The tensor's in-place modification counter, or None for an inference tensor (it has none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class ModulesToSave(_Wrapper):
    """A module trained as a full copy per adapter (e.g. a classification head).

    Args:
        original: the original module, used when no active adapter has a copy.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()

    @property
    def weight(self) -> Tensor:
        """The weight of the module in use (see :meth:`module_in_use`)."""
        return self.module_in_use().weight

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """Runs the active adapter's copy (or, with routing, each row group's copy)."""
        if self.disabled:
            return self.original(x, *args, **kwargs)
        if self.routing is not None:
            self._check_batch(x)
            out = self.original(x, *args, **kwargs).clone()
            for name, rows in self.routing.groups:
                if name in self.copies:
                    out.index_copy_(0, rows, self.copies[name](x.index_select(0, rows), *args, **kwargs))
            return out
        return self.module_in_use()(x, *args, **kwargs)

    def module_in_use(self) -> nn.Module:
        """The first active adapter's copy, or the original when no active adapter has one."""
        for name in self.active_adapters:
            if name in self.copies:
                return self.copies[name]
        return self.original


def add_to_weight(weight: Tensor, delta: Tensor, safe: bool = False) -> None:
    """``weight += delta`` in place, computed in float32 whatever the weight's dtype.

    Args:
        weight: a base module's weight, any floating dtype.
        delta: same shape; cast to float32 for the addition.
        safe: check the result is finite in the weight's dtype before writing it (a float16 sum can
            overflow there though finite in float32).

    Raises:
        ValueError: ``safe`` and the result holds NaN or inf (the weight is left unchanged).
    """
    merged = (weight.detach().float() + delta.detach().float()).to(weight.dtype)
    if safe and not torch.isfinite(merged).all():
        raise ValueError("merging would put NaN or inf into the base weights; the adapter is broken")
    with torch.no_grad():
        weight.copy_(merged)


def outer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every module, in ``named_modules``' order; peftkit's wrappers are reported,
    their insides are not (nor walked: a model with many adapters has most of its modules there)."""
    seen: set[int] = set()
    pending: list[tuple[str, nn.Module]] = [("", model)]
    while pending:
        name, module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if isinstance(module, (AdapterLayer, ModulesToSave)):
            continue
        children = [(f"{name}.{key}" if name else key, child) for key, child in module._modules.items()]
        pending.extend(reversed([(path, child) for path, child in children if child is not None]))
