"""FSDP2 for ``peftkit train --fsdp`` under ``torchrun``: the model's parameters sharded across processes.

PyTorch's ``fully_shard`` (FSDP2) is applied to each repeated block of the base model (the classes
transformers lists in ``_no_split_modules``, e.g. ``LlamaDecoderLayer``) and then to the base model
itself, after the adapters are injected, so frozen base weights and trainable adapter weights of a
block are sharded together (FSDP2 shards per parameter and handles frozen ones). Gradients are
averaged across processes as under DDP, so the loop's loss scaling is the same.

What runs differently from DDP (docs/design.md, "FSDP2"):
- the loss is the model's own (the fused output-head loss reads the head's weight outside the
  model's forward, where FSDP2 keeps it sharded);
- every process evaluates (FSDP2 gathers parameters collectively, so a forward on one process alone
  would wait forever); the inputs are the same, so are the outputs, and only the main process reports;
- saving gathers the full parameters on every process (:func:`full_parameters` for an adapter,
  :func:`with_full_state_dict` for a whole model) and the main process writes;
- 4-bit bases (nf4, fp4) shard their packed weights too and train as in one process (measured on
  the CPU: equal losses within 1e-4); refused with one line: 8-bit bases (bitsandbytes' int8 weight
  loses its scales when FSDP2 gathers it: ``'Parameter' object has no attribute 'CB'``),
  whole-model methods (soft prompts live outside the base model's blocks) and checkpoints
  (``save_every``/``--resume``: the optimizer state would need a sharded checkpoint).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from peftkit.foundation.errors import UsageError

__all__ = [
    "check_shardable",
    "full_parameters",
    "gradient_sync",
    "is_sharded",
    "shard",
    "to_float",
    "with_full_state_dict",
]


def check_shardable(quantize: str, model_level_method: bool, save_every: int, resume: bool) -> None:
    """Refuse what FSDP2 training does not support, before anything loads or is written.

    Raises:
        UsageError: naming the setting and what to use instead.
    """
    if quantize == "int8":
        raise UsageError(
            "fsdp with quantize='int8': bitsandbytes' 8-bit weights lose their scales when FSDP2 gathers "
            "them; use quantize nf4 or fp4 with fsdp, or int8 with DDP (torchrun without --fsdp)"
        )
    if model_level_method:
        raise UsageError(
            "fsdp shards the base model's blocks, and this method's parameters live outside them "
            "(soft prompts); use DDP (torchrun without --fsdp)"
        )
    if save_every or resume:
        raise UsageError(
            "fsdp does not write checkpoints yet (the sharded optimizer state); set save_every: 0 "
            "and no --resume, or use DDP (torchrun without --fsdp)"
        )


def shard(model: nn.Module, mesh: Any = None) -> nn.Module:
    """Apply ``fully_shard`` to each repeated block of ``model``'s base model, then to the base model.

    Args:
        model: a ``PeftModel`` or a plain transformers model, adapters already injected.
        mesh: the device mesh (default: every process of the default process group, on this device).

    Returns:
        ``model``, now sharded in place.

    Raises:
        UsageError: the model names no repeated block class to shard.
    """
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in base.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise UsageError(
            f"fsdp: {type(base).__name__} names no repeated block to shard (transformers' "
            "_no_split_modules); use DDP (torchrun without --fsdp)"
        )
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(base, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether any module of ``model`` is sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Inside the block every FSDP2 module of ``model`` holds its full parameters (all processes must
    enter together); outside, they are sharded again. A model that is not sharded is left alone."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()


class _FullStateDictModel:
    """A sharded transformers model whose ``save_pretrained`` writes the gathered full state dict."""

    def __init__(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, directory: Any) -> None:
        self.model.save_pretrained(directory, state_dict=self.state_dict)


def with_full_state_dict(model: nn.Module) -> Any:
    """``model`` with its full state dict gathered to this process's CPU memory (every process must
    call this together; the main process then saves it with ``save_pretrained``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # a tied weight (the output head sharing the embedding): saved once
            state.pop(name, None)
        seen.add(id(param))
    return _FullStateDictModel(model, state)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """FSDP2's counterpart of DDP's ``no_sync``: gradients of the micro-batches inside the block are
    kept local (``enabled=False``) and reduced with the last one's."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.set_requires_gradient_sync(enabled, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.set_requires_gradient_sync(True, recurse=False)


def to_float(value: torch.Tensor | float) -> float:
    """A 0-dim tensor, possibly a replicated DTensor (a gradient norm under FSDP2), as a float."""
    full = getattr(value, "full_tensor", None)
    return float(full() if callable(full) else value)
