"""Bottleneck adapters: a small residual MLP on the output of a sublayer, ``y + up(act(down(y)))``.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP" (2019), arXiv:1902.00751 (after the
attention output and after the feed-forward output); Pfeiffer et al., "AdapterFusion" (2021),
arXiv:2005.00247 (after the feed-forward output only). The up-projection starts at zero, so a freshly
wrapped model computes what the base model computes.

The nonlinearity makes the adapter impossible to fold into the weights: it is not mergeable. Hugging
Face PEFT has no bottleneck adapters; the file format is peftkit's own (docs/format.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.adapter_config import AdapterConfig
from peftkit.foundation.modules import is_conv1d

#: Output projections of attention blocks, by architecture: Llama-style (Mistral, Qwen…), GPT-2,
#: BERT-style, T5 (self- and cross-attention).
ATTENTION_OUTPUTS = (
    r"self_attn\.o_proj",
    r"attn\.c_proj",
    r"attention\.output\.dense",
    r"(?:SelfAttention|EncDecAttention)\.o",
)
#: Output projections of feed-forward blocks. BERT's ``layer.<i>.output.dense`` is matched exactly, so
#: ``attention.output.dense`` (which also ends in ``output.dense``) is not taken for a feed-forward.
FEEDFORWARD_OUTPUTS = (
    r"mlp\.down_proj",
    r"mlp\.c_proj",
    r"layer\.\d+\.output\.dense",
    r"DenseReluDense\.wo",
)
NON_LINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}
DEFAULT_REDUCTION_FACTOR = 16


def default_targets(after_attention: bool, after_feedforward: bool) -> str:
    """The full-match regular expression selecting the sublayer outputs of the chosen placements."""
    names = (ATTENTION_OUTPUTS if after_attention else ()) + (
        FEEDFORWARD_OUTPUTS if after_feedforward else ()
    )
    return rf"(?:.*\.)?(?:{'|'.join(names)})"


@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapter settings (peftkit only: ``peft_type`` ``"BOTTLENECK"``).

    Args:
        bottleneck_size: width of the bottleneck; or give ``reduction_factor`` instead.
        reduction_factor: bottleneck width = output width // reduction_factor (16 when neither is given).
        non_linearity: ``"relu"``, ``"gelu"``, ``"silu"`` (``"swish"``) or ``"tanh"``.
        after_attention: place adapters after attention output projections (when ``target_modules``
            is not given).
        after_feedforward: place adapters after feed-forward output projections (same).
        init_weights: zero up-projection (True: the identity at init) or random (False; for tests).

    Without ``target_modules`` the adapters go after the attention and/or feed-forward output
    projections of Llama-style, GPT-2, BERT-style and T5 models (see ``ATTENTION_OUTPUTS`` and
    ``FEEDFORWARD_OUTPUTS``), selected by one regular expression stored in ``target_modules``. Any
    other architecture: name its output projections in ``target_modules`` (a list matches names or
    dotted suffixes, so ``"output.dense"`` also matches ``attention.output.dense``).

    Raises:
        ValueError: both or a non-positive size, an unknown ``non_linearity``, or no placement.
    """

    peft_type: ClassVar[str] = "BOTTLENECK"
    mergeable: ClassVar[bool] = False  # a non-linear module added after a layer: no weight holds it

    bottleneck_size: int | None = None
    reduction_factor: int | None = None
    non_linearity: str = "relu"
    after_attention: bool = True
    after_feedforward: bool = True
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ValueError(
                f"{name} got bottleneck_size={self.bottleneck_size} and reduction_factor="
                f"{self.reduction_factor}; give one of them"
            )
        for field_name in ("bottleneck_size", "reduction_factor"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}.{field_name}={value!r} must be a positive integer")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"{name}.non_linearity={self.non_linearity!r} must be one of {list(NON_LINEARITIES)}"
            )
        if self.target_modules is None:
            if not (self.after_attention or self.after_feedforward):
                raise ValueError(
                    f"{name} has after_attention=False and after_feedforward=False: nothing to adapt; "
                    "enable one, or name modules in target_modules"
                )
            object.__setattr__(
                self, "target_modules", default_targets(self.after_attention, self.after_feedforward)
            )

    def is_supported(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_conv1d(module)

    def build_adapter(self, module_name: str, base: nn.Module) -> nn.Module:
        hidden = base.weight.shape[1] if is_conv1d(base) else base.out_features
        size = self.bottleneck_size or max(1, hidden // (self.reduction_factor or DEFAULT_REDUCTION_FACTOR))
        return BottleneckAdapter(base, hidden, size, self.non_linearity, zero_up=self.init_weights)


@dataclass(frozen=True)
class HoulsbyConfig(BottleneckConfig):
    """Houlsby et al. (2019) placement: after the attention output and after the feed-forward output."""

    after_attention: bool = True
    after_feedforward: bool = True


@dataclass(frozen=True)
class PfeifferConfig(BottleneckConfig):
    """Pfeiffer et al. (2021) placement: after the feed-forward output only."""

    after_attention: bool = False
    after_feedforward: bool = True


class BottleneckAdapter(nn.Module):
    """``y + up(act(down(y)))`` on a layer's output ``y``.

    Args:
        base: the wrapped layer; only its weight's device and dtype are read.
        hidden: the layer's output width.
        bottleneck_size: the inner width.
        non_linearity: a key of ``NON_LINEARITIES``.
        zero_up: start the up-projection (weight and bias) at zero, making the adapter the identity.
    """

    def __init__(
        self, base: nn.Module, hidden: int, bottleneck_size: int, non_linearity: str, zero_up: bool = True
    ) -> None:
        super().__init__()
        dtype = base.weight.dtype
        if dtype in (torch.float16, torch.bfloat16):  # small, and stable to train in float32
            dtype = torch.float32
        kwargs = {"device": base.weight.device, "dtype": dtype}
        self.adapter_down = nn.Linear(hidden, bottleneck_size, **kwargs)
        self.non_linearity = NON_LINEARITIES[non_linearity]()
        self.adapter_up = nn.Linear(bottleneck_size, hidden, **kwargs)
        if zero_up:
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, base: nn.Module, x: Tensor, base_output: Tensor) -> Tensor:
        """base_output: (..., hidden) → (..., hidden); ``x`` is not used."""
        h = base_output.to(self.adapter_down.weight.dtype)
        update = self.adapter_up(self.non_linearity(self.adapter_down(h)))  # (..., hidden)
        return base_output + update.to(base_output.dtype)

    def merge(self, base: nn.Module, safe: bool = False) -> None:
        """Always raises: see :data:`NOT_MERGEABLE`."""
        raise NotImplementedError(NOT_MERGEABLE)

    def unmerge(self, base: nn.Module) -> None:
        """Always raises (never merged)."""
        raise NotImplementedError(NOT_MERGEABLE)


NOT_MERGEABLE = (
    "bottleneck adapters cannot be merged into the weights: they apply a nonlinearity to the layer's "
    "output, which no change of the weights reproduces. Keep the PeftModel for inference (nothing was "
    "merged), or unload() to drop the adapters."
)
