"""The generic wrapped layer: the original module kept as ``base``, plus named adapters.

Every method that works inside layers (LoRA, IA³, bottleneck adapters…) plugs into
:class:`AdapterLayer` through the small :class:`Adapter` protocol. Mixed batches (one adapter per
row) are not the layer's business: whoever runs one hands every wrapper a ``route`` function for the
call (:data:`LayerRoute`, :data:`ModuleRoute`) and takes it back afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

BASE_ADAPTER_NAME = "__base__"

#: ``route(layer, x, base_output) -> output``: an :class:`AdapterLayer`'s output for a mixed batch, from
#: its input x (batch first) and its base module's output.
LayerRoute = Callable[["AdapterLayer", Tensor, Tensor], Tensor]
#: ``route(wrapper, x, *args, **kwargs) -> output``: a :class:`ModulesToSave`'s output for a mixed batch.
ModuleRoute = Callable[..., Any]


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


class _Wrapper(nn.Module):
    """State shared by peftkit's wrappers, set by the model for all of them at once.

    ``route``, when set, computes the output of a mixed batch instead of the active adapters (see
    :data:`LayerRoute`); the caller that sets it clears it in a ``finally``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.route: Callable[..., Any] | None = None


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
        With a ``route`` set (a mixed batch), the route computes the output from x and the base output.
        """
        if not (args or kwargs or self.disabled) and self.route is None:
            adapter = self._only_adapter_in_use()
            with_base = getattr(adapter, "forward_with_base", None)
            y = None if with_base is None else with_base(self.base, x)
            if y is not None:
                return y
        y = self.base(x, *args, **kwargs)
        if self.disabled:
            return y
        if self.route is not None:
            return self.route(self, x, y)
        for name in self.active_adapters:
            if name in self.adapters and name not in self.merged_adapters:
                y = self.adapters[name](self.base, x, y)
        return y

    def _only_adapter_in_use(self) -> nn.Module | None:
        """The one active, unmerged adapter this layer has, or None when there are none or several."""
        merged = self.merged_adapters
        in_use = [name for name in self.active_adapters if name in self.adapters and name not in merged]
        return self.adapters[in_use[0]] if len(in_use) == 1 else None

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
        """Runs the active adapter's copy (or, with a ``route`` set, what the route computes)."""
        if self.disabled:
            return self.original(x, *args, **kwargs)
        if self.route is not None:
            return self.route(self, x, *args, **kwargs)
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
