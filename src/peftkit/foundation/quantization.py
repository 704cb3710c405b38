"""Quantized base models (QLoRA): loading in 4 or 8 bits with bitsandbytes, and dequantizing for merges.

Schemes: ``"nf4"`` (4-bit NormalFloat with double quantization, the QLoRA default), ``"fp4"`` and
``"int8"`` (LLM.int8()). bitsandbytes is an optional dependency (``pip install 'peftkit[qlora]'``); it
runs 4-bit and 8-bit layers on the CPU too. A model a user loaded with transformers'
``BitsAndBytesConfig`` works the same way: its linear layers are ``bitsandbytes.nn.Linear4bit`` /
``Linear8bitLt``, which subclass ``nn.Linear``, so every LoRA-style method finds and wraps them.

Adapters train in float32 next to the frozen quantized weights. Merging cannot write into 4-bit or
8-bit storage: ``merge_and_unload`` first turns each quantized layer back into a plain ``nn.Linear``
(:func:`dequantized_linear`), so the merged model is exact and unquantized.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from typing import TYPE_CHECKING, Any

from peftkit.foundation.errors import UsageError, closest

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

__all__ = [
    "BITSANDBYTES_CONFIG_FIELDS",
    "INSTALL_HINT",
    "SCHEMES",
    "check_quantization_options",
    "dequantize_weight",
    "dequantized_linear",
    "describe_precision",
    "is_quantized",
    "keep_trainable_layout",
    "logical_numel",
    "quantization_config",
    "require_bitsandbytes",
]

SCHEMES = ("nf4", "fp4", "int8")
INSTALL_HINT = "pip install 'peftkit[qlora]' (or pip install bitsandbytes)"
_QUANTIZED_WEIGHTS = ("Params4bit", "Int8Params")  # bitsandbytes' parameter classes
# transformers' BitsAndBytesConfig arguments a user may set (tests check them against its signature;
# listed here so that options are checked before transformers is imported)
BITSANDBYTES_CONFIG_FIELDS = (
    "llm_int8_threshold",
    "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage",
)
_OWN_OPTIONS = ("compute_dtype", "double_quant")  # quantization_config's shorter names
DEFAULT_COMPUTE_DTYPE = "bfloat16"  # what 4-bit layers compute in unless compute_dtype says otherwise


def check_quantization_options(options: dict[str, Any]) -> None:
    """Raise a one-line ``UsageError`` for an option :func:`quantization_config` does not take,
    with the closest known name (``load_in_4bit``/``load_in_8bit`` follow from the scheme)."""
    known = (*_OWN_OPTIONS, *BITSANDBYTES_CONFIG_FIELDS)
    for name in options:
        if name not in known:
            raise UsageError(
                f"unknown quantization option {name!r}{closest(name, known)}; options are {', '.join(known)}"
            )


def require_bitsandbytes() -> None:
    """Raise a one-line ``UsageError`` naming the install command when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"quantized bases need bitsandbytes, which is not installed: {INSTALL_HINT}")


def quantization_config(
    scheme: str,
    compute_dtype: str | torch.dtype = DEFAULT_COMPUTE_DTYPE,
    double_quant: bool = True,
    **options: Any,
) -> Any:
    """A transformers ``BitsAndBytesConfig`` for ``scheme``.

    Args:
        scheme: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        compute_dtype: the dtype 4-bit layers compute in (``bnb_4bit_compute_dtype``).
        double_quant: quantize the 4-bit block scales too (``bnb_4bit_use_double_quant``, ~0.4 bits
            per weight saved).
        options: any other ``BitsAndBytesConfig`` argument (``llm_int8_threshold``,
            ``llm_int8_skip_modules``, ``bnb_4bit_quant_storage``...), passed through;
            ``bnb_4bit_compute_dtype`` and ``bnb_4bit_use_double_quant`` are the two above.

    Raises:
        UsageError: an unknown scheme, or bitsandbytes is not installed.
    """
    if scheme not in SCHEMES:
        raise UsageError(f"unknown quantization {scheme!r}; use one of {', '.join(SCHEMES)}")
    check_quantization_options(options)
    require_bitsandbytes()
    # BitsAndBytesConfig's own names for the two settings above (passed on twice, they were a TypeError)
    compute_dtype = options.pop("bnb_4bit_compute_dtype", compute_dtype)
    double_quant = options.pop("bnb_4bit_use_double_quant", double_quant)
    from transformers import BitsAndBytesConfig

    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **options)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=scheme,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        **options,
    )


def describe_precision(scheme: str | None, dtype: str, options: dict[str, Any] | None = None) -> str:
    """What a base loaded with ``scheme`` (None: unquantized) and ``dtype`` holds, for people:
    ``"nf4 linear layers computing in bfloat16, the rest float32"``; ``dtype`` alone unquantized."""
    if scheme in (None, "none"):
        return dtype
    if scheme == "int8":
        return f"int8 linear layers, the rest {dtype}"
    options = options or {}
    compute = options.get("bnb_4bit_compute_dtype", options.get("compute_dtype", DEFAULT_COMPUTE_DTYPE))
    return f"{scheme} linear layers computing in {str(compute).removeprefix('torch.')}, the rest {dtype}"


def logical_numel(param: nn.Parameter) -> int:
    """The weights a parameter stands for: its ``numel()``, except that a bitsandbytes 4-bit weight
    stores two in each byte of its packed storage (its ``quant_state`` keeps the logical shape)."""
    state = getattr(param, "quant_state", None)
    if type(param).__name__ == "Params4bit" and state is not None:
        return math.prod(state.shape)
    return param.numel()


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` owns a bitsandbytes 4-bit or 8-bit weight (a wrapper that only forwards its
    base's ``weight`` does not)."""
    return type(_own_weight(module)).__name__ in _QUANTIZED_WEIGHTS


def _own_weight(module: nn.Module) -> Any:
    """The module's own ``weight`` parameter (not one a wrapper forwards from its base), or None."""
    return module._parameters.get("weight") if hasattr(module, "_parameters") else None


def keep_trainable_layout(model: nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers of ``model`` in their standard layout, so gradients through
    them stay right.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight for a faster kernel on its
    first forward in eval mode without gradients (evaluation, generation), and its backward then reads
    the repacked weight as if it were not: the input gradients come out zero (measured on SmolLM2:
    LoRA gradients of every layer but the last were zero after one evaluation, and a run diverged).
    So the repacking is switched off on every 4-bit layer, and a layer already repacked is unpacked
    with bitsandbytes' own inverse (what its ``state_dict`` and ``.cuda()`` do).
    """
    for module in model.modules():
        if type(_own_weight(module)).__name__ != "Params4bit":
            continue
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )


def dequantize_weight(module: nn.Module) -> Tensor:
    """The weight a quantized linear layer computes with, as a float32 ``(out, in)`` tensor.

    Raises:
        TypeError: ``module`` is not a bitsandbytes 4-bit or 8-bit layer.
    """
    import bitsandbytes as bnb

    weight = module.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        return bnb.functional.dequantize_4bit(*_unpacked_4bit(weight)).float()
    if kind == "Int8Params":
        scales = weight.SCB if weight.SCB is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()
    raise TypeError(f"{type(module).__name__} holds no bitsandbytes 4-bit or 8-bit weight")


def _unpacked_4bit(weight: Any) -> tuple[Tensor, Any]:
    """The 4-bit data and quantization state in bitsandbytes' standard layout, the layer untouched.

    On the CPU bitsandbytes repacks a layer's 4-bit weight for its kernel on the first forward and
    keeps the block scales as bfloat16 there. Its own inverse (used by ``state_dict``) changes the
    layer's state and re-quantizes the scales, so it is applied to a copy here, and the scales the
    kernel really uses are kept unquantized.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    nested = state.original_nested
    copy_ = copy.copy(state)
    copy_.original_nested = False  # keep the inverse from re-quantizing the scales
    data, copy_ = _convert_weight_packed_for_cpu_inverse(weight.data, copy_)
    if nested:
        copy_.absmax = state.absmax.T.reshape(-1).float()  # (blocks,), as the kernel reads them
        copy_.nested, copy_.state2, copy_.offset = False, None, None
    return data, copy_


def dequantized_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` computing what the quantized ``module`` computes, in ``dtype``
    (default: the 4-bit layer's compute dtype, float32 for 8-bit layers)."""
    import torch
    from torch import nn

    weight = dequantize_weight(module)
    dtype = dtype or getattr(module, "compute_dtype", None) or torch.float32
    bias = getattr(module, "bias", None)
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if bias is not None:
            linear.bias.copy_(bias.detach().to(dtype))
    linear.train(module.training)
    return linear
