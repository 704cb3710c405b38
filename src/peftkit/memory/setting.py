"""What an estimate is for: the training step's :class:`Setting`, and how each linear layer takes part
in training (:class:`Use`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
OPTIMIZERS = ("adamw", "sgd", "adamw8bit")
LOSSES = ("model", "fused")
# bits per weight of bitsandbytes' layouts: 4-bit values, plus one absmax per block of 64 weights (a
# float32, or with double quantization an 8-bit code and a float32 per 256 blocks); int8: a float32
# scale per output row on top (added per layer).
QUANTIZED_BITS = {"nf4": 4.0, "fp4": 4.0, "int8": 8.0}


@dataclass(frozen=True)
class Setting:
    """One training step's shape and choices (see ``estimate``'s arguments of the same names).

    Attributes:
        tokens: ``batch × seq``.
        weight_bytes: bytes per element of the weights' dtype.
    """

    tokens: int
    weight_bytes: int
    optimizer: str
    grad_checkpointing: bool
    fast_lora: bool
    loss: str = "model"
    batch: int = 1
    padded: bool = False
    quantize: str | None = None
    double_quant: bool = True

    @property
    def adapter_bytes(self) -> int:
        return max(self.weight_bytes, 4)  # half-precision bases get float32 adapters


def check_choices(optimizer: str, loss: str, quantize: str | None) -> None:
    """Raises ValueError naming an optimizer, loss or quantization scheme the estimate does not model."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} must be one of {list(OPTIMIZERS)}")
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} must be one of {list(LOSSES)}")
    if quantize not in (None, *QUANTIZED_BITS):
        raise ValueError(f"quantize={quantize!r} must be None or one of {list(QUANTIZED_BITS)}")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a name in :data:`DTYPES` (or one of their dtypes); raises ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}")


@dataclass(frozen=True)
class Use:
    """How a linear layer takes part in training: ``"full"`` weight, ``"lora"`` adapter or ``"frozen"``."""

    kind: str
    r: int = 0
    dropout: float = 0.0


FROZEN = Use("frozen")
FULL = Use("full")
