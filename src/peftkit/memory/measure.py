"""The memory one training step really holds: :func:`measure_training_step`.

Activations are counted by saved-tensor hooks (what autograd keeps for the backward); the CPU peak by a
dispatch mode that tracks the storages operators create while they are alive; on CUDA the allocator's
own peak.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["MeasuredMemory", "measure_training_step"]


@dataclass(frozen=True)
class MeasuredMemory:
    """What one training step really held, in bytes (from :func:`measure_training_step`).

    Attributes:
        weights: unique parameter storages.
        gradients: unique storages of the ``.grad`` tensors after the backward.
        optimizer_states: unique tensor storages in the optimizer's state.
        activations: unique storages autograd saved during the forward (parameters excluded).
        peak: the most held at once during the step: on CUDA ``torch.cuda.max_memory_allocated``; on
            CPU the parameters, buffers and optimizer states plus the most bytes of tensors created by
            operators and alive together (kernels' internal scratch is not seen).
        peak_source: ``"cuda"`` or ``"tracked tensors"``.
    """

    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    peak: int
    peak_source: str


def measure_training_step(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor] | None = None,
) -> MeasuredMemory:
    """Run two training steps and report what the second one held.

    The first step creates the optimizer state; the second is measured: parameters, gradients and
    optimizer state by unique storage, activations by ``torch.autograd.graph.saved_tensors_hooks`` (unique
    storages, parameters excluded), and the peak (see :class:`MeasuredMemory`). Call ``model.train()``
    first if dropout should be active.

    Args:
        model: returns an output with ``.loss`` for ``model(**inputs)`` (a transformers model with
            ``labels`` in ``inputs``, or a PeftModel around one).
        inputs: e.g. ``{"input_ids": ids, "labels": ids}``.
        optimizer: defaults to ``torch.optim.AdamW`` with learning rate 0 over the trainable parameters
            (its state is allocated, the weights do not change).
        loss_fn: ``loss_fn(model, inputs)`` gives the loss to back-propagate; default
            ``model(**inputs).loss``.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.AdamW(trainable, lr=0.0)
    _training_step(model, inputs, optimizer, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    params = _storage_bytes(model.parameters())
    held = params + _storage_bytes(model.buffers()) + _storage_bytes(_state_tensors(optimizer))
    saved: dict[int, int] = {}
    own = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, _identity):
            _training_step(model, inputs, optimizer, loss_fn)
        peak, source = torch.cuda.max_memory_allocated(device), "cuda"
    else:
        with _LiveTensors() as live, torch.autograd.graph.saved_tensors_hooks(pack, _identity):
            _training_step(model, inputs, optimizer, loss_fn)
        peak, source = held + live.peak, "tracked tensors"
    return MeasuredMemory(
        weights=params,
        gradients=_storage_bytes(p.grad for p in trainable if p.grad is not None),
        optimizer_states=_storage_bytes(_state_tensors(optimizer)),
        activations=sum(saved.values()),
        peak=peak,
        peak_source=source,
    )


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _training_step(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor] | None,
) -> None:
    loss = model(**inputs).loss if loss_fn is None else loss_fn(model, inputs)
    loss.backward()
    optimizer.step()


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]


def _storage_bytes(tensors: Any) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class _LiveTensors(TorchDispatchMode):
    """Counts the bytes of storages created by operators while they are alive; remembers the most."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            pointer, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or pointer in inputs or pointer in self._alive:  # a view, in place, or known
                continue
            self.live += size
            self.peak = max(self.peak, self.live)
            self._alive[pointer] = weakref.ref(storage, lambda _, p=pointer, n=size: self._freed(p, n))
        return out

    def _freed(self, pointer: int, size: int) -> None:
        self.live -= size
        self._alive.pop(pointer, None)
