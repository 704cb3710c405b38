"""DoRA: LoRA with the adapted weight split into a trained magnitude and a LoRA-updated direction.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (2024), arXiv:2402.09353.
``W' = m · (W + s·B·A) / ||W + s·B·A||`` with the norm taken per output row and *detached* from the
gradient graph (paper §4.3), so the magnitude ``m`` (out,) and the LoRA factors train separately and
backward needs no gradient through the norm. ``m`` starts at ``||W + s·B·A||`` (``||W||`` when B is
zero), so a freshly wrapped model computes what the base model computes.

Switched on with ``LoraConfig(use_dora=True)``; supported bases: ``nn.Linear`` and transformers'
``Conv1D``. The magnitude parameter is ``lora_magnitude_vector`` (Hugging Face PEFT's on-disk key).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.foundation.modules import is_conv1d
from peftkit.foundation.quantization import dequantize_weight, is_quantized
from peftkit.methods.lora.adapters import LoraLinear


def weight_row_norm(weight: Tensor, delta: Tensor) -> Tensor:
    """``||W + ΔW||`` per output row.

    Args:
        weight: (out, in), the base weight.
        delta: (out, in), s·B·A.

    Returns:
        (out,).
    """
    return torch.linalg.vector_norm(weight + delta, dim=1)


class DoraLinear(LoraLinear):
    """DoRA for ``nn.Linear`` and ``Conv1D``.

    ``y = W x + b + (m/n − 1) ⊙ W x + (m/n) ⊙ s·B A x`` with ``n = ||W + s·B·A||`` detached: the same
    as ``(m/n) ⊙ (W + s·B·A) x + b``, written so the base output is reused.

    Args:
        base: the wrapped layer; its weight initialises the magnitude.
        r, scaling, dropout: as :class:`peftkit.methods.lora.LoraLinear`.

    Raises:
        ValueError: ``base`` is not a ``nn.Linear`` or ``Conv1D``.
    """

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0) -> None:
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise ValueError(
                f"use_dora=True supports nn.Linear and transformers' Conv1D, not {type(base).__name__}; "
                "leave that module out with exclude_modules or use plain LoRA for it"
            )
        super().__init__(base, r, scaling, dropout)
        out_features = self.lora_B.out_features
        self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, **_like(self.lora_A.weight)))
        # m / n of the merge, kept so unmerge can divide it back out (the norm of the merged weight differs).
        self.register_buffer("merged_factor", None, persistent=False)

    def reset_parameters(self, init: bool | str, base: nn.Module | None = None) -> None:
        """LoRA's initialisation, then ``m = ||W + s·B·A||`` (needs ``base``)."""
        super().reset_parameters(init, base)
        if base is not None:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self._norm(base))

    def _base_weight(self, base: nn.Module) -> Tensor:
        """The base weight as (out, in) in the adapter's dtype (a 4-bit/8-bit one dequantized)."""
        if is_quantized(base):
            return dequantize_weight(base).to(self.lora_A.weight.dtype)
        weight = base.weight.T if self.transposed else base.weight
        return weight.to(self.lora_A.weight.dtype)

    def _lora_weight(self) -> Tensor:
        """s·B·A as (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _norm(self, base: nn.Module) -> Tensor:
        """``||W + s·B·A||`` per output row, detached (out,)."""
        return weight_row_norm(self._base_weight(base), self._lora_weight()).detach()

    def forward(self, base: nn.Module, x: Tensor, base_output: Tensor) -> Tensor:
        """x: (..., in); base_output: (..., out) → (..., out)."""
        x = x.to(self.lora_A.weight.dtype)
        factor = self.lora_magnitude_vector / self._norm(base)  # (out,)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = getattr(base, "bias", None)
            without_bias = base_output if bias is None else base_output - bias
            base_part = without_bias.to(x.dtype)  # W x, (..., out)
        else:  # dropout on x: the direction term must see the same dropped input as the LoRA path
            x = self.dropout(x)
            base_part = F.linear(x, self._base_weight(base))
        lora_part = self.lora_B(self.lora_A(x)) * self.scaling  # (..., out)
        update = (factor - 1) * base_part + factor * lora_part
        return base_output + update.to(base_output.dtype)

    def merge(self, base: nn.Module, safe: bool = False) -> None:
        """W ← (m/n)·(W + s·B·A) row-wise, in float32; (m/n) is kept for :meth:`unmerge`.

        Raises:
            ValueError: ``safe`` and the result holds NaN or inf (the weight is left unchanged).
        """
        weight = self._base_weight(base).detach().float()  # (out, in)
        delta = self._lora_weight().detach().float()
        factor = self.lora_magnitude_vector.detach().float() / weight_row_norm(weight, delta)
        merged = factor.unsqueeze(1) * (weight + delta)
        if safe and not torch.isfinite(merged).all():
            raise ValueError("merging would put NaN or inf into the base weights; the adapter is broken")
        self._write(base, merged)
        self.merged_factor = factor

    def unmerge(self, base: nn.Module) -> None:
        """W ← W' / (m/n) − s·B·A, with the factor stored at merge time."""
        if self.merged_factor is None:
            raise RuntimeError("DoRA unmerge without a merge: there is no stored factor to divide out")
        merged = self._base_weight(base).detach().float()
        delta = self._lora_weight().detach().float()
        self._write(base, merged / self.merged_factor.unsqueeze(1) - delta)
        self.merged_factor = None

    def _write(self, base: nn.Module, weight: Tensor) -> None:
        """Copy a float32 (out, in) weight into the base, in its layout and dtype."""
        with torch.no_grad():
            base.weight.copy_((weight.T if self.transposed else weight).to(base.weight.dtype))


def _like(tensor: Tensor) -> dict:
    return {"device": tensor.device, "dtype": tensor.dtype}
