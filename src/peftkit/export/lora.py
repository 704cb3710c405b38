"""A LoRA adapter as llama.cpp's LoRA GGUF: ``blk.N.<tensor>.weight.lora_a`` / ``.lora_b`` per adapted
layer and one ``adapter.lora.alpha`` for the file.

llama.cpp computes ``W·x + (alpha / r)·B·(A·x)`` with ``r`` read from each A, so everything that makes
peftkit's scale ``s`` of a layer differ from ``lora_alpha / r`` (rsLoRA's ``alpha / √r``, ``rank_pattern``,
``alpha_pattern``) is folded into that layer's B: ``B' = B · s · r / alpha``. B is also changed as the
base tensor is (Llama's q/k row permutation), so ``B'·A`` is the update of the converted weight.
What a LoRA file cannot hold is refused with a pointer to the merged export.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from peftkit.arithmetic.weighted import lora_factors
from peftkit.core.layer import AdapterLayer
from peftkit.export.architectures import Architecture
from peftkit.export.gguf_file import PlannedTensor, tensor_type
from peftkit.export.merged import tensor_change
from peftkit.foundation.errors import UsageError
from peftkit.methods.lora.adapters import LoraEmbedding
from peftkit.methods.lora.config import LoraConfig

__all__ = ["check_lora_expressible", "fold_scale", "lora_tensors"]

_USE_MERGED = "llama.cpp's LoRA cannot express it; use --format gguf (the merged model) instead"


def check_lora_expressible(config: Any) -> None:
    """Refuse an adapter config a LoRA GGUF cannot hold.

    Raises:
        UsageError: not LoRA (IA³, prompts, prefixes, bottleneck, selective), DoRA, trained biases or
            ``modules_to_save``; the message says to use the merged export.
    """
    if not isinstance(config, LoraConfig):
        raise UsageError(f"the adapter is {config.peft_type}, not LoRA: {_USE_MERGED}")
    if config.use_dora:
        raise UsageError(f"the adapter is DoRA (its update is renormalised per row): {_USE_MERGED}")
    if config.modules_to_save:
        raise UsageError(f"the adapter trains whole modules ({list(config.modules_to_save)}): {_USE_MERGED}")
    if config.bias != "none":
        raise UsageError(f"the adapter trains biases (bias={config.bias!r}): {_USE_MERGED}")


def fold_scale(B: Tensor, scale: float, rank: int, alpha: float) -> Tensor:
    """B with peftkit's scale ``scale`` folded in, for llama.cpp's ``alpha / rank`` (``alpha`` 0: scale 1).

    Args:
        B: (out, r).

    Returns:
        ``B · scale · rank / alpha``, (out, r), so that ``(alpha / rank) · B'·A = scale · B·A``.
    """
    return B * (scale * rank / alpha if alpha else scale)


def lora_tensors(
    model: nn.Module, adapter_name: str, arch: Architecture, outtype: str
) -> tuple[float, list[PlannedTensor]]:
    """``(alpha, tensors)`` of adapter ``adapter_name`` of a wrapped model, for a LoRA GGUF.

    Args:
        model: a ``PeftModel`` holding the adapter (not merged).

    Raises:
        UsageError: the adapter cannot be a llama.cpp LoRA (see :func:`check_lora_expressible`), or adapts
            a layer llama.cpp has no tensor for (e.g. a tied output head).
    """
    config = model.peft_config[adapter_name]
    check_lora_expressible(config)
    alpha = float(config.lora_alpha)
    base_config = model.config
    names = arch.tensor_names(base_config.num_hidden_layers)
    tied = bool(getattr(base_config, "tie_word_embeddings", False)) or not arch.head_written
    planned = []
    for path, layer in model.model.named_modules():
        if not isinstance(layer, AdapterLayer) or adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        if isinstance(adapter, LoraEmbedding):
            raise UsageError(f"the adapter trains the embeddings ({path}): {_USE_MERGED}")
        try:
            A, B, scale = lora_factors(adapter)  # (r, in), (out, r)
        except TypeError as error:
            raise UsageError(f"{path}: {error}: {_USE_MERGED}") from error
        name = names.get_name(f"{path}.weight", try_suffixes=(".weight",))
        if name is None or (tied and name == "output.weight"):
            raise UsageError(f"{arch.name}: the adapted module {path} has no llama.cpp tensor: {_USE_MERGED}")
        B = tensor_change(arch, base_config, f"{path}.weight")(fold_scale(B, scale, A.shape[0], alpha))
        for suffix, factor in ((".lora_a", A), (".lora_b", B)):
            shape = tuple(factor.shape)
            planned.append(
                PlannedTensor(
                    name + suffix, shape, tensor_type(name + suffix, shape, outtype), lambda f=factor: f
                )
            )
    if not planned:
        raise UsageError(f"adapter {adapter_name!r} adapts no layer: nothing to export")
    return alpha, planned
