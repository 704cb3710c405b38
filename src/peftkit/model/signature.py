"""The PeftModel subclass made once per base-model class, whose ``forward`` shows the base's parameters.

transformers reads a model's inputs from its ``forward``: ``Trainer`` keeps the dataset columns named
in ``inspect.signature(model.forward)`` and takes label names from ``type(model).forward``, TRL copies
``type(model).forward``'s signature. A class per base class serves both readings.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any, TypeVar

from torch import nn

from peftkit.model.routing import Routing

ModelClass = TypeVar("ModelClass", bound=nn.Module)


@functools.cache
def subclass_for(peft_class: type[ModelClass], base_class: type[nn.Module]) -> type[ModelClass]:
    """The subclass of ``peft_class`` for bases of ``base_class``: its ``forward`` (``peft_class``'s, with
    an ``adapter_names`` keyword) shows the base's parameters; ``peft_class`` itself where the base's
    ``forward`` cannot be read or has an ``adapter_names`` of its own."""
    signature = _forward_signature(peft_class, base_class)
    if signature is None:
        return peft_class

    def forward(
        self: nn.Module, *args: Any, adapter_names: Sequence[str] | Routing | None = None, **kwargs: Any
    ) -> Any:
        return peft_class.forward(self, *args, adapter_names=adapter_names, **kwargs)

    forward.__doc__ = peft_class.forward.__doc__
    forward.__qualname__ = f"{peft_class.__qualname__}.forward"
    forward.__signature__ = signature  # type: ignore[attr-defined]
    namespace = {
        "forward": forward,
        "__module__": peft_class.__module__,
        "__qualname__": peft_class.__qualname__,
    }
    return type(peft_class.__name__, (peft_class,), namespace)


def _forward_signature(peft_class: type[nn.Module], base_class: type[nn.Module]) -> inspect.Signature | None:
    """``base_class.forward``'s signature (``self`` first) with ``peft_class.forward``'s keyword-only
    ``adapter_names`` put before any ``**kwargs``; None when it cannot be read or has that name."""
    try:
        signature = inspect.signature(base_class.forward)
    except (TypeError, ValueError):  # a forward inspect cannot read (compiled, built-in)
        return None
    if "adapter_names" in signature.parameters:
        return None
    parameters = list(signature.parameters.values())
    at = next((i for i, p in enumerate(parameters) if p.kind is p.VAR_KEYWORD), len(parameters))
    parameters.insert(at, inspect.signature(peft_class.forward).parameters["adapter_names"])
    return signature.replace(parameters=parameters)
