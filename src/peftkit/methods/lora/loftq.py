"""LoftQ initialisation: LoRA factors that start by cancelling the quantization error of the base.

Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models" (2023),
arXiv:2310.08659. On a quantized base the model computes with Q, not the original W. LoftQ starts A, B
at the best rank-r approximation of the error: ``s·B·A = [W − Q]_r`` (truncated SVD, Eckart–Young), so
``Q + s·B·A`` is as close to W as a rank-r update can make it at step 0.

This is Hugging Face PEFT's ``replace_lora_weights_loftq`` (one pass on a model already quantized with
bitsandbytes; the paper's alternating iterations would re-quantize ``W − s·B·A`` and so change the base,
which a loaded 4-bit model does not allow). Unlike that function, the error is divided by the adapter's
scaling s, so the product the layer adds (``s·B·A``) is the approximation whatever ``lora_alpha`` is.
W is read from the model's safetensors files (never a pickle); Q is the layer's dequantized weight.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.core.layer import AdapterLayer
from peftkit.foundation.quantization import dequantize_weight, is_quantized
from peftkit.methods.lora.adapters import LoraLinear

__all__ = ["LOFTQ_INIT", "loftq_factors", "replace_lora_weights_loftq"]

LOFTQ_INIT = "loftq"  # the init_lora_weights value


def loftq_factors(weight: Tensor, quantized: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor]:
    """A, B with ``s·B·A`` the best rank-r approximation (Frobenius norm) of ``weight − quantized``.

    Args:
        weight: W, the original weight, (out, in).
        quantized: Q, the weight the quantized layer computes with, (out, in).
        r: rank.
        scaling: s, the adapter's factor on B·A.

    Returns:
        A (r, in) = sqrt(S_r)·V_rᵀ and B (out, r) = U_r·sqrt(S_r), from the SVD of ``(W − Q) / s``; float32.

    Raises:
        ValueError: the shapes differ, or r exceeds min(out, in).
    """
    if weight.shape != quantized.shape or weight.dim() != 2:
        raise ValueError(
            f"LoftQ needs two (out, in) weights of one shape; got {tuple(weight.shape)} and "
            f"{tuple(quantized.shape)}"
        )
    if r > min(weight.shape):
        raise ValueError(f"r={r} exceeds min(out, in)={min(weight.shape)}; lower r (or use rank_pattern)")
    error = (weight.float() - quantized.float()) / scaling  # (out, in)
    U, S, Vh = torch.linalg.svd(error, full_matrices=False)  # (out, k), (k,), (k, in)
    root = torch.sqrt(S[:r])  # (r,)
    return root.unsqueeze(1) * Vh[:r], U[:, :r] * root.unsqueeze(0)


def replace_lora_weights_loftq(
    model: nn.Module, model_path: str | os.PathLike[str] | None = None, adapter_name: str = "default"
) -> dict[str, tuple[float, float]]:
    """Set the LoRA factors of every quantized layer of ``adapter_name`` by LoftQ (in place).

    Args:
        model: a :class:`peftkit.PeftModel` (or its base) on a base loaded quantized (bitsandbytes).
        model_path: the base's float weights: a directory of ``*.safetensors`` files or one such file;
            default: the directory the base was loaded from (``name_or_path``, as
            :func:`peftkit.foundation.loading.load_model` leaves it).
        adapter_name: the LoRA adapter to initialise.

    Returns:
        Module name → (‖W − Q‖_F, ‖W − Q − s·B·A‖_F), for the quantized layers the adapter wraps.
        Its unquantized layers keep their initialisation (their W − Q is zero).

    Raises:
        ValueError: no layer of the adapter wraps a quantized weight, the float weights cannot be
            found, or a weight is missing from them or has another shape.
    """
    base_model = model.model if hasattr(model, "peft_config") else model  # the names the files use
    layers = dict(_quantized_lora_layers(base_model, adapter_name))
    if not layers:
        raise ValueError(
            f"LoftQ initialisation needs a quantized base: adapter {adapter_name!r} wraps no bitsandbytes "
            "layer (load the base with quantize='nf4', or use the default init_lora_weights=True)"
        )
    files = _safetensors_files(model_path, base_model)
    errors = {}
    with _WeightReader(files) as reader:
        for name, (base, adapter) in layers.items():
            weight = reader.get(f"{name}.weight")  # (out, in)
            quantized = dequantize_weight(base)  # (out, in), float32
            if weight.shape != quantized.shape:
                raise ValueError(
                    f"LoftQ: {name}.weight in the float weights has shape {tuple(weight.shape)} but the "
                    f"quantized layer's is {tuple(quantized.shape)}; model_path is another model's"
                )
            weight = weight.to(quantized.device, torch.float32)
            A, B = loftq_factors(weight, quantized, adapter.lora_A.out_features, adapter.scaling)
            with torch.no_grad():
                adapter.lora_A.weight.copy_(A)
                adapter.lora_B.weight.copy_(B)
            before = torch.linalg.matrix_norm(weight - quantized).item()
            after = torch.linalg.matrix_norm(weight - quantized - adapter.delta_weight().float()).item()
            errors[name] = (before, after)
    return errors


def _quantized_lora_layers(
    model: nn.Module, adapter_name: str
) -> Iterator[tuple[str, tuple[nn.Module, LoraLinear]]]:
    """(module name, (quantized base layer, plain LoRA adapter)) for each layer LoftQ applies to."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
            adapter = module.adapters[adapter_name]
            if type(adapter) is LoraLinear and is_quantized(module.base):
                yield name, (module.base, adapter)


def _safetensors_files(model_path: str | os.PathLike[str] | None, model: nn.Module) -> list[Path]:
    """The safetensors files holding the base's float weights."""
    given = model_path is not None
    path = Path(model_path if given else _local_source(getattr(model, "name_or_path", "") or "")).expanduser()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
    files = [f for f in files if f.suffix == ".safetensors"]
    if not files:
        where = f"model_path={str(model_path)!r}" if given else f"the base's name_or_path {str(path)!r}"
        raise ValueError(
            f"LoftQ needs the base's float weights as .safetensors files, and {where} holds none; pass "
            "model_path= (a model directory or .safetensors file)"
        )
    return files


def _local_source(name_or_path: str) -> str:
    """A Hub id's snapshot in the local Hugging Face cache (nothing is downloaded), else the name."""
    if not name_or_path or Path(name_or_path).expanduser().exists():
        return name_or_path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, allow_patterns=["*.safetensors"], local_files_only=True)
    except Exception:  # not a Hub id, or not cached: the caller's error names model_path
        return name_or_path


class _WeightReader:
    """Tensors by name from one or more safetensors files, read one at a time."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self._handles: list[tuple[Any, set[str]]] = []  # (open file, its tensor names)

    def __enter__(self) -> _WeightReader:
        from safetensors import safe_open

        handles = [safe_open(str(file), framework="pt") for file in self.files]
        self._handles = [(handle, set(handle.keys())) for handle in handles]
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles = []

    def get(self, key: str) -> Tensor:
        for handle, names in self._handles:
            if key in names:
                return handle.get_tensor(key)
        raise ValueError(
            f"LoftQ: {key} is not in {', '.join(str(f) for f in self.files)}; model_path must hold the "
            "float weights of this base model"
        )
