"""IA³: learned vectors that rescale a layer's output, or, on feed-forward layers, its input.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
(2022), arXiv:2205.05638. Ordinary targets (keys, values): ``y = l ⊙ (W x + b)`` with ``l`` of shape
(out, 1). ``feedforward_modules``: ``y = W (l ⊙ x) + b`` with ``l`` of shape (1, in). The vectors start
at one, so a freshly wrapped model computes what the base model computes. Both forms fold into the
weights (and, for output scaling, the bias), so IA³ is mergeable.

Supported bases: ``nn.Linear`` and transformers' ``Conv1D`` (weight stored as (in, out)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.core.adapter_config import AdapterConfig
from peftkit.core.targeting import adaptable_modules, name_matches
from peftkit.foundation.errors import closest
from peftkit.foundation.modules import is_conv1d
from peftkit.foundation.quantization import is_quantized
from peftkit.methods.default_targets import ia3_targets


@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """IA³ settings; field names and defaults are Hugging Face PEFT's.

    Args:
        feedforward_modules: targeted modules whose *input* is scaled (the paper's feed-forward
            layers, e.g. ``["down_proj"]``), with the same matching rules as ``target_modules``;
            every one of them must also be targeted.
        fan_in_fan_out: kept for file compatibility; transformers' ``Conv1D`` is detected by type.
        init_ia3_weights: start the vectors at one (True) or random normal (False: not the identity;
            for tests).
    """

    peft_type: ClassVar[str] = "IA3"

    feedforward_modules: str | Sequence[str] | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(targets, tuple) and isinstance(feedforward, tuple):
            outside = [name for name in feedforward if not name_matches(name, targets)]
            if outside:
                raise ValueError(
                    f"IA3Config.feedforward_modules={list(feedforward)} names {outside}, which "
                    f"target_modules={list(targets)} does not select{closest(outside[0], targets)}; "
                    "feedforward_modules must be among the targets (add them to target_modules)"
                )

    def is_supported(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_conv1d(module)

    def with_default_targets(self, model: nn.Module) -> IA3Config:
        """Unset ``target_modules``: the model's keys, values and feed-forward output, the last also in
        ``feedforward_modules`` unless that is set."""
        if self.target_modules is not None:
            return self
        candidates = [name for name, module in adaptable_modules(model) if self.is_supported(module)]
        default = ia3_targets(model, candidates)
        feedforward = (
            default.feedforward_modules if self.feedforward_modules is None else self.feedforward_modules
        )
        return self.replace(target_modules=default.target_modules, feedforward_modules=feedforward)

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`AdapterConfig.to_dict`, without the layer-selection fields when unset: Hugging
        Face PEFT's IA3Config lacks them (set, they round-trip through peftkit; HF PEFT warns)."""
        data = super().to_dict()
        for name in ("layers_to_transform", "layers_pattern"):
            if data[name] is None:
                del data[name]
        return data

    def build_adapter(self, module_name: str, base: nn.Module) -> nn.Module:
        feedforward = self.feedforward_modules is not None and name_matches(
            module_name, self.feedforward_modules
        )
        return IA3Linear(base, feedforward, ones=self.init_ia3_weights)


def scaled_weight(weight: Tensor, ia3_l: Tensor, transposed: bool) -> Tensor:
    """The base weight with the IA³ vector folded in.

    Args:
        weight: (out, in), or (in, out) for ``Conv1D`` (``transposed``).
        ia3_l: (out, 1) for output scaling, (1, in) for input scaling (feed-forward targets).

    Returns:
        the weight's shape: rows (output scaling) or columns (input scaling) of W multiplied by ``l``.
    """
    return weight * (ia3_l.T if transposed else ia3_l)


class IA3Linear(nn.Module):
    """IA³ for ``nn.Linear`` and ``Conv1D``.

    Args:
        base: the wrapped layer; only its shape and weight layout are read.
        feedforward: scale the input (``ia3_l`` of shape (1, in)) instead of the output ((out, 1)).
        ones: initialise ``ia3_l`` to ones (the identity); else random normal.
    """

    def __init__(self, base: nn.Module, feedforward: bool, ones: bool = True) -> None:
        super().__init__()
        self.transposed = is_conv1d(base)
        if self.transposed:  # Conv1D stores (in, out)
            in_features, out_features = base.weight.shape
        else:  # nn.Linear, 4-bit and 8-bit ones included (their stored weight is packed)
            in_features, out_features = base.in_features, base.out_features
        shape = (1, in_features) if feedforward else (out_features, 1)
        dtype = base.weight.dtype
        if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point:
            dtype = torch.float32  # small vectors, trained in float32 (also next to quantized weights)
        self.ia3_l = nn.Parameter(torch.randn(shape, device=base.weight.device, dtype=dtype))
        if ones:
            nn.init.ones_(self.ia3_l)
        self.feedforward = feedforward

    @property
    def scales_input(self) -> bool:
        """Whether this adapter scales the layer's input (one such adapter per layer may be active)."""
        return self.feedforward

    def forward(self, base: nn.Module, x: Tensor, base_output: Tensor) -> Tensor:
        """x: (..., in); base_output: (..., out) → (..., out).

        Input scaling is applied as its effect on the output, ``W ((l − 1) ⊙ x)`` added to ``W x + b``
        (bias unchanged): the base output has already been computed by the wrapper, so this costs one
        extra matmul of the layer's size per call; merge for inference to remove it.
        """
        scale = self.ia3_l.flatten()  # (in,) or (out,)
        if not self.feedforward:
            return (base_output.to(scale.dtype) * scale).to(base_output.dtype)
        if is_quantized(base):  # 4-bit/8-bit weights are read by their own kernel
            shifted = (x.to(scale.dtype) * (scale - 1)).to(x.dtype)
            bias = 0 if getattr(base, "bias", None) is None else base.bias
            return base_output + (base(shifted) - bias).to(base_output.dtype)
        weight = base.weight.T if self.transposed else base.weight  # (out, in)
        shifted = (x.to(scale.dtype) * (scale - 1)).to(weight.dtype)  # (..., in)
        return base_output + F.linear(shifted, weight).to(base_output.dtype)

    def merge(self, base: nn.Module, safe: bool = False) -> None:
        """W ← W scaled by ``l`` (and b ← l ⊙ b for output scaling), computed in float32.

        Raises:
            ValueError: ``l`` has a zero entry (unmerging divides by it), or ``safe`` and the result is
                not finite; the weights are left unchanged.
        """
        if bool((self.ia3_l == 0).any()):
            raise ValueError(
                "ia3_l has zero entries: merging could not be undone (unmerge divides by ia3_l); keep "
                "the adapter unmerged"
            )
        self._scale_base(base, self.ia3_l.detach().float(), safe)

    def unmerge(self, base: nn.Module) -> None:
        """Divide the merged scaling back out (exact up to float rounding)."""
        self._scale_base(base, 1 / self.ia3_l.detach().float(), safe=False)

    def _scale_base(self, base: nn.Module, factor: Tensor, safe: bool) -> None:
        weight = scaled_weight(base.weight.detach().float(), factor, self.transposed)
        bias = getattr(base, "bias", None)
        new_bias = None
        if bias is not None and not self.feedforward:
            new_bias = bias.detach().float() * factor.flatten()
        if safe and not (
            torch.isfinite(weight).all() and (new_bias is None or torch.isfinite(new_bias).all())
        ):
            raise ValueError("merging would put NaN or inf into the base weights; the adapter is broken")
        with torch.no_grad():
            base.weight.copy_(weight.to(base.weight.dtype))
            if new_bias is not None:
                bias.copy_(new_bias.to(bias.dtype))
