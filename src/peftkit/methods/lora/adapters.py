"""LoRA's adapters and maths: ``y = W x + s·B(A(dropout(x)))`` on a frozen W.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), arXiv:2106.09685;
rsLoRA scaling ``alpha / sqrt(r)``: Kalajdzievski (2023), arXiv:2312.03732.

B starts at zero, so a freshly wrapped model computes exactly what the base model computes.
Supported bases: ``nn.Linear``, transformers' ``Conv1D`` (weight stored transposed), ``nn.Embedding``,
``nn.Conv1d`` and ``nn.Conv2d``. The variants (:mod:`~peftkit.methods.lora.dora`,
:mod:`~peftkit.methods.lora.pissa`) subclass :class:`LoraLinear`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_state

from peftkit.core.layer import add_to_weight
from peftkit.foundation.modules import is_conv1d
from peftkit.ops import draw_dropout, fast_lora_enabled, frozen_linear_lora, lora_linear

__all__ = [
    "LoraConv",
    "LoraEmbedding",
    "LoraLinear",
    "conv_delta_weight",
    "linear_delta_weight",
    "lora_scaling",
]

FAST_DTYPES = (torch.float32, torch.bfloat16)  # where peftkit.ops.lora_linear is tested


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor s on B·A: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def linear_delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """ΔW = s·B·A for a linear layer.

    Args:
        lora_A: (r, in_features).
        lora_B: (out_features, r).

    Returns:
        (out_features, in_features), in the dtype of the inputs.
    """
    return (lora_B @ lora_A) * scaling


def conv_delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """ΔW for a convolution whose A has the base kernel and B is a 1×1 (or 1) kernel.

    Args:
        lora_A: (r, in_channels, *kernel).
        lora_B: (out_channels, r, 1, …).

    Returns:
        (out_channels, in_channels, *kernel): B composed with A.
    """
    conv = F.conv2d if lora_A.dim() == 4 else F.conv1d
    # Treat A's input channels as a batch so one convolution composes the two kernels.
    return conv(lora_A.transpose(0, 1), lora_B).transpose(0, 1) * scaling  # (out, in, *kernel)


def _init_factors(lora_A: Tensor, lora_B: Tensor, init: bool | str) -> None:
    """LoRA's initialisation in place: A Kaiming-uniform (True) or normal(0, 1/r) ("gaussian"), B zero;
    False leaves both as they are (random).

    Args:
        lora_A: (r, in_features) or (r, in_channels, *kernel).
        lora_B: (out_features, r) or (out_channels, r, 1, …).
    """
    if init is False:
        return
    if init == "gaussian":
        nn.init.normal_(lora_A, std=1 / lora_A.shape[0])
    else:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    nn.init.zeros_(lora_B)


class _AdditiveLora(nn.Module):
    """Merging shared by the LoRA adapters: the base weight plus or minus ``delta_weight()``."""

    def delta_weight(self) -> Tensor:
        raise NotImplementedError

    def merge(self, base: nn.Module, safe: bool = False) -> None:
        """W ← W + ΔW (in float32); ``safe`` refuses a non-finite result."""
        add_to_weight(base.weight, self.delta_weight(), safe)

    def unmerge(self, base: nn.Module) -> None:
        """W ← W − ΔW."""
        add_to_weight(base.weight, -self.delta_weight())


class LoraLinear(_AdditiveLora):
    """LoRA for ``nn.Linear`` and transformers' ``Conv1D``: ``y + s·B(A(dropout(x)))``.

    Args:
        base: the wrapped layer; only its shape and weight layout are read.
        r: rank.
        scaling: s.
        dropout: dropout probability on the low-rank path's input.
    """

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.transposed = is_conv1d(base)  # Conv1D stores its weight as (in, out)
        in_features, out_features = _linear_shape(base)
        kwargs = _factory_kwargs(base.weight)
        self.lora_A = nn.Linear(in_features, r, bias=False, **kwargs)
        self.lora_B = nn.Linear(r, out_features, bias=False, **kwargs)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def reset_parameters(self, init: bool | str, base: nn.Module | None = None) -> None:
        """Kaiming-uniform (True) or normal(0, 1/r) ("gaussian") A and zero B; False keeps both random."""
        _init_factors(self.lora_A.weight, self.lora_B.weight, init)

    def forward(self, base: nn.Module, x: Tensor, base_output: Tensor) -> Tensor:
        """x: (..., in_features); base_output: (..., out_features) → same shape as base_output.

        Runs :func:`peftkit.ops.lora_linear` (same numbers, one saved input, the dropped elements
        recorded cheaply) unless it is switched off (``peftkit.ops.fast_lora(False)``) or does not
        apply (see ``_fast_path_applies``).
        """
        if self._fast_path_applies(x):
            dropped, keep = draw_dropout(x, self._active_dropout())
            A, B = self.lora_A.weight, self.lora_B.weight
            return lora_linear(x, base_output, A, B, self.scaling, dropped, keep)
        x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.dropout(x))) * self.scaling  # (..., out_features)
        return base_output + update.to(base_output.dtype)

    def forward_with_base(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """The layer's output with the base layer computed inside the same op
        (:func:`peftkit.ops.frozen_linear_lora`: no second gradient of x to allocate and add), or None
        where that does not apply: the fast path is off or does not apply, ``forward`` is overridden
        (DoRA…), the base is not a plain ``nn.Linear`` (or transformers' ``Conv1D``) with a frozen
        weight of x's and the adapter's dtype, or it has hooks or a patched ``forward``.
        """
        weight = base.weight
        if not (
            (type(base) is nn.Linear or self.transposed)
            and type(self).forward is LoraLinear.forward
            and not weight.requires_grad
            and type(weight.data) is Tensor  # not a quantized or distributed tensor subclass
            and x.dtype == weight.dtype == self.lora_A.weight.dtype
            and "forward" not in base.__dict__  # e.g. accelerate's device hooks
            and not _has_hooks(base)
            and self._fast_path_applies(x)
        ):
            return None
        dropped, keep = draw_dropout(x, self._active_dropout())
        A, B = self.lora_A.weight, self.lora_B.weight
        weight = weight.T if self.transposed else weight  # Conv1D stores (in, out)
        return frozen_linear_lora(x, weight, base.bias, A, B, self.scaling, dropped, keep)

    def _active_dropout(self) -> float:
        """The dropout probability in force now: 0 in eval mode or without dropout."""
        dropout = self._modules["dropout"]
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def _fast_path_applies(self, x: Tensor) -> bool:
        """float32/bfloat16, no autocast (its per-op casts would mix dtypes in the hand-written backward),
        plain ``nn.Linear`` factors, and no hooks that expect to see their calls.

        Reads the submodules from ``_modules`` directly: mixed batches ask every adapter of every layer.
        """
        lora_A, lora_B = self._modules["lora_A"], self._modules["lora_B"]
        return (
            fast_lora_enabled()
            and type(lora_A) is nn.Linear
            and type(lora_B) is nn.Linear
            and x.dtype in FAST_DTYPES
            and lora_A.weight.dtype in FAST_DTYPES
            and not torch.is_autocast_enabled(x.device.type)
            and not _has_hooks(lora_A, lora_B, self._modules["dropout"])
        )

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float] | None:
        """(A, B, s) when this adapter adds exactly ``s·B·A·x`` (forward not overridden, no dropout
        active, no hooks), else None; mixed batches stack such adapters (:mod:`peftkit.ops.multi_lora`)."""
        dropout = self._modules["dropout"]
        A = self._modules["lora_A"].weight
        if (
            type(self).forward is not LoraLinear.forward
            or (dropout.training and isinstance(dropout, nn.Dropout))
            or not self._fast_path_applies(A)
        ):
            return None
        return A, self._modules["lora_B"].weight, self.scaling

    def delta_weight(self) -> Tensor:
        """ΔW in the base weight's layout: (out, in), or (in, out) for ``Conv1D``."""
        delta = linear_delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)
        return delta.T if self.transposed else delta


class LoraEmbedding(_AdditiveLora):
    """LoRA for ``nn.Embedding``: ``y + s·(onehot(x)·Aᵀ)·Bᵀ``, no dropout (inputs are indices).

    Parameters are named as Hugging Face PEFT names them on disk: ``lora_embedding_A`` (r, vocab) and
    ``lora_embedding_B`` (dim, r). Here A starts at zero and B is random, as there.
    """

    def __init__(self, base: nn.Embedding, r: int, scaling: float) -> None:
        super().__init__()
        kwargs = _factory_kwargs(base.weight)
        self.lora_embedding_A = nn.Parameter(torch.empty(r, base.num_embeddings, **kwargs))
        self.lora_embedding_B = nn.Parameter(torch.empty(base.embedding_dim, r, **kwargs))
        self.scaling = scaling

    def reset_parameters(self, init: bool | str, base: nn.Module | None = None) -> None:
        """Zero A and normal B (True or "gaussian"); False makes both random."""
        if init is False:
            nn.init.normal_(self.lora_embedding_A)
        else:
            nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def forward(self, base: nn.Module, x: Tensor, base_output: Tensor) -> Tensor:
        """x: (...) token ids; base_output: (..., dim) → (..., dim)."""
        after_A = F.embedding(  # (..., r)
            x,
            self.lora_embedding_A.T,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        update = (after_A @ self.lora_embedding_B.T) * self.scaling  # (..., dim)
        return base_output + update.to(base_output.dtype)

    def delta_weight(self) -> Tensor:
        """ΔW: (num_embeddings, embedding_dim)."""
        return linear_delta_weight(self.lora_embedding_A, self.lora_embedding_B, self.scaling).T


class LoraConv(_AdditiveLora):
    """LoRA for ``nn.Conv1d`` / ``nn.Conv2d``: A is a conv with the base kernel, B a 1×1 conv.

    Raises:
        ValueError: the base convolution is grouped (``groups > 1``).
    """

    def __init__(self, base: nn.Conv1d | nn.Conv2d, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        if base.groups != 1:
            raise ValueError(
                f"LoRA on a grouped convolution (groups={base.groups}) is not supported; "
                "leave it out with exclude_modules"
            )
        conv = nn.Conv1d if isinstance(base, nn.Conv1d) else nn.Conv2d
        kwargs = _factory_kwargs(base.weight)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A = conv(
            base.in_channels,
            r,
            base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            padding_mode=base.padding_mode,
            bias=False,
            **kwargs,
        )
        self.lora_B = conv(r, base.out_channels, ones, stride=ones, bias=False, **kwargs)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def reset_parameters(self, init: bool | str, base: nn.Module | None = None) -> None:
        """As :meth:`LoraLinear.reset_parameters`."""
        _init_factors(self.lora_A.weight, self.lora_B.weight, init)

    def forward(self, base: nn.Module, x: Tensor, base_output: Tensor) -> Tensor:
        """x: (batch, in_channels, *spatial); base_output: (batch, out_channels, *spatial_out)."""
        x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        return base_output + update.to(base_output.dtype)

    def delta_weight(self) -> Tensor:
        """ΔW: (out_channels, in_channels, *kernel)."""
        return conv_delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)


def _linear_shape(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a ``nn.Linear`` or a ``Conv1D``."""
    if is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    return base.in_features, base.out_features


def _factory_kwargs(weight: Tensor) -> dict[str, Any]:
    """Adapter parameters live on the base weight's device; half-precision bases get float32 adapters
    (as Hugging Face PEFT's ``autocast_adapter_dtype``): small, and stable to train."""
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return {"device": weight.device, "dtype": dtype}


def _has_hooks(*modules: nn.Module) -> bool:
    """Whether forward hooks (on these modules or global) would miss calls the fast path skips."""
    if module_state._global_forward_hooks or module_state._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
