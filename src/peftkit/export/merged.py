"""The tensors of a whole model in llama.cpp's names and layout (the merged GGUF, or a base model's).

Each tensor is read from the model when its turn to be written comes, changed as llama.cpp's converter
changes it (Llama's q/k row permutation, Gemma's ``1 + w`` norms) and converted; the output head is
left out where it is the token embedding (tied), which llama.cpp then reuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gguf
import torch
from torch import Tensor, nn

from peftkit.core.layer import AdapterLayer
from peftkit.export.architectures import Architecture, llama3_rope_factors, permute_rows, phi3_rope_factors
from peftkit.export.gguf_file import PlannedTensor, tensor_type
from peftkit.foundation.errors import UsageError

__all__ = ["base_weights", "head_is_tied", "model_tensors", "tensor_change"]


def head_is_tied(model: nn.Module) -> bool:
    """Whether the output head is the token embedding (the same storage, or equal values)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None:
        return True
    if head.weight.data_ptr() == embedding.weight.data_ptr():
        return True
    return head.weight.shape == embedding.weight.shape and bool(torch.equal(head.weight, embedding.weight))


def tensor_change(arch: Architecture, config: Any, hf_name: str) -> Callable[[Tensor], Tensor]:
    """What llama.cpp's converter does to tensor ``hf_name`` before writing it (identity for most)."""
    if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return lambda t: permute_rows(t, config.num_attention_heads)
    if arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return lambda t: permute_rows(t, config.num_key_value_heads or config.num_attention_heads)
    if arch.norm_shift and hf_name.endswith("norm.weight"):
        return lambda t: t.float() + arch.norm_shift
    return lambda t: t


def model_tensors(model: nn.Module, arch: Architecture, outtype: str) -> list[PlannedTensor]:
    """The GGUF tensors of a transformers causal LM (no adapter wrappers left in it).

    Raises:
        UsageError: a tensor llama.cpp has no name for, or an untied head where llama.cpp has none.
    """
    config = model.config
    names = arch.tensor_names(config.num_hidden_layers)
    tied = head_is_tied(model)
    head = model.get_output_embeddings()
    head_key = next((f"{path}.weight" for path, module in model.named_modules() if module is head), None)
    planned = []
    for key, tensor in base_weights(model).items():
        if key == head_key and tied:
            continue
        if key == head_key and not arch.head_written:
            raise UsageError(
                f"{arch.name}: the output head differs from the token embedding (a trained lm_head?), and "
                "llama.cpp's graph always uses the embedding as the head"
            )
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UsageError(
                f"{arch.name}: tensor {key} has no llama.cpp name; this model cannot be exported"
            )
        planned.append(_planned(name, tensor, tensor_change(arch, config, key), outtype))
    planned += _extra_tensors(arch, config)
    return planned


def base_weights(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict under the base model's own names: a layer peftkit wraps keeps its original
    module as ``base`` (``<path>.base.weight`` is read as ``<path>.weight``) and its adapters are left out."""
    wrapped = [path for path, module in model.named_modules() if isinstance(module, AdapterLayer)]
    weights = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        path = next((p for p in wrapped if key.startswith(p + ".")), None)
        if path is None:
            weights[key] = tensor
        elif key.startswith(f"{path}.base."):
            weights[path + key[len(path) + len(".base") :]] = tensor
    return weights


def _planned(name: str, tensor: Tensor, change: Callable[[Tensor], Tensor], outtype: str) -> PlannedTensor:
    shape = tuple(tensor.shape)
    return PlannedTensor(name, shape, tensor_type(name, shape, outtype), lambda: change(tensor.detach()))


def _extra_tensors(arch: Architecture, config: Any) -> list[PlannedTensor]:
    """Tensors llama.cpp needs that the checkpoint has no weight for (RoPE frequency factors)."""
    extra = []
    factors = llama3_rope_factors(config) if arch.gguf_arch == gguf.MODEL_ARCH.LLAMA else None
    if factors is not None:
        extra.append((_tensor_name(gguf.MODEL_TENSOR.ROPE_FREQS), factors))
    long_short = phi3_rope_factors(config) if arch.gguf_arch == gguf.MODEL_ARCH.PHI3 else None
    if long_short is not None:
        extra += [
            (_tensor_name(gguf.MODEL_TENSOR.ROPE_FACTORS_LONG), long_short[0]),
            (_tensor_name(gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT), long_short[1]),
        ]
    return [
        PlannedTensor(name, tuple(t.shape), gguf.GGMLQuantizationType.F32, lambda t=t: t) for name, t in extra
    ]


def _tensor_name(tensor: gguf.MODEL_TENSOR) -> str:
    return gguf.TENSOR_NAMES[tensor] + ".weight"
