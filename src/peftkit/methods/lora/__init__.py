"""LoRA: a frozen weight W plus a trainable low-rank update, ``y = W x + s·B(A(dropout(x)))``.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), arXiv:2106.09685;
rsLoRA scaling ``alpha / sqrt(r)``: Kalajdzievski (2023), arXiv:2312.03732.

B starts at zero, so a freshly wrapped model computes exactly what the base model computes.
Supported bases: ``nn.Linear``, transformers' ``Conv1D`` (weight stored transposed), ``nn.Embedding``,
``nn.Conv1d`` and ``nn.Conv2d``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.config import AdapterConfig
from peftkit.layers import add_to_weight, is_conv1d
from peftkit.ops import dropout_mask, fast_lora_enabled, lora_linear

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian")
FAST_DTYPES = (torch.float32, torch.bfloat16)  # where peftkit.ops.lora_linear is tested
PRINCIPAL_INIT = re.compile(r"pissa(_niter_(\d+))?|olora")  # PiSSA / OLoRA: methods/pissa.py


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """LoRA settings; field names and defaults are Hugging Face PEFT's.

    Args:
        r: rank of the update (4–32 is the usual range).
        lora_alpha: scaling numerator: ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the input of the low-rank path only.
        use_rslora: rank-stabilised scaling.
        init_lora_weights: True (Kaiming-uniform A, zero B), ``"gaussian"`` (normal A with std 1/r,
            zero B), False (random A and B: the wrapped model differs from the base; for tests), or
            ``"pissa"`` / ``"pissa_niter_K"`` / ``"olora"`` (:mod:`peftkit.methods.lora.pissa`).
        rank_pattern: per-module rank, ``{name regex: r}``, matched as ``(.*\\.)?(key)$``.
        alpha_pattern: per-module alpha, same matching.
        fan_in_fan_out: kept for file compatibility; transformers' ``Conv1D`` is detected by type.
        bias: which biases train too: ``"none"``, ``"all"``, or ``"lora_only"`` (the targeted modules').
        use_dora: DoRA (magnitude and direction, :mod:`peftkit.methods.lora.dora`); Linear and Conv1D only.
    """

    peft_type: ClassVar[str] = "LORA"
    unsupported_fields: ClassVar[Mapping[str, Any]] = {
        "lora_bias": False,
        "layer_replication": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "megatron_config": None,
        "trainable_token_indices": None,
        "target_parameters": None,
        "use_qalora": False,
        "alora_invocation_tokens": None,
        "velora_config": None,
        "monteclora_config": None,
        "arrow_config": None,
        "kasa_config": None,
        "use_bdlora": None,
        "megatron_core": "megatron.core",
        "qalora_group_size": 16,
        "runtime_config": None,
        "ensure_weight_tying": False,
    }

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r={self.r!r} must be a positive integer (4–32 is typical)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias={self.bias!r} must be one of {list(BIAS_MODES)}")
        principal = is_principal_init(self.init_lora_weights)
        if self.init_lora_weights not in INIT_MODES and not principal:
            raise ValueError(
                f"LoraConfig.init_lora_weights={self.init_lora_weights!r} must be True, False, 'gaussian', "
                "'pissa', 'pissa_niter_<iterations>' or 'olora'"
            )
        if principal and self.use_dora:
            raise ValueError(
                f"LoraConfig.use_dora=True with init_lora_weights={self.init_lora_weights!r} is not "
                "supported; use one of them"
            )
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}]={rank!r} must be a positive integer")

    def rank_for(self, module_name: str) -> int:
        """The rank for ``module_name``: the first matching ``rank_pattern`` key, else ``r``."""
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        """The alpha for ``module_name``: the first matching ``alpha_pattern`` key, else ``lora_alpha``."""
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def is_supported(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)) or is_conv1d(module)

    def build_adapter(self, module_name: str, base: nn.Module) -> nn.Module:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        scaling = lora_scaling(alpha, r, self.use_rslora)
        if self.use_dora:
            from peftkit.methods.lora.dora import DoraLinear  # dora.py builds on this file's LoraLinear

            adapter: nn.Module = DoraLinear(base, r, scaling, self.lora_dropout)  # refuses other bases
        elif is_principal_init(self.init_lora_weights):
            from peftkit.methods.lora.pissa import PrincipalLoraLinear  # PiSSA / OLoRA, builds on LoraLinear

            adapter = PrincipalLoraLinear(base, r, scaling, self.lora_dropout)  # refuses other bases
        elif isinstance(base, nn.Embedding):
            adapter = LoraEmbedding(base, r, scaling)
        elif isinstance(base, (nn.Conv1d, nn.Conv2d)):
            adapter = LoraConv(base, r, scaling, self.lora_dropout)
        else:
            adapter = LoraLinear(base, r, scaling, self.lora_dropout)
        adapter.reset_parameters(self.init_lora_weights, base)
        return adapter


def is_principal_init(init: object) -> bool:
    """Whether ``init_lora_weights`` names PiSSA (``"pissa"``, ``"pissa_niter_K"``) or OLoRA."""
    return isinstance(init, str) and PRINCIPAL_INIT.fullmatch(init) is not None


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
        if init is False:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_features)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, base: nn.Module, x: Tensor, base_output: Tensor) -> Tensor:
        """x: (..., in_features); base_output: (..., out_features) → same shape as base_output.

        Runs :func:`peftkit.ops.lora_linear` (same numbers, one saved input, a bool dropout mask) unless
        it is switched off (``peftkit.ops.fast_lora(False)``) or does not apply (see ``_fast_path_applies``).
        """
        if self._fast_path_applies(x):
            p = self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.dropout.training else 0.0
            mask, keep = dropout_mask(x, p) if p > 0 else (None, 1.0)
            A, B = self.lora_A.weight, self.lora_B.weight
            return lora_linear(x, base_output, A, B, self.scaling, mask, keep)
        x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.dropout(x))) * self.scaling  # (..., out_features)
        return base_output + update.to(base_output.dtype)

    def _fast_path_applies(self, x: Tensor) -> bool:
        """float32/bfloat16, no autocast (its per-op casts would mix dtypes in the hand-written backward),
        plain ``nn.Linear`` factors, and no hooks that expect to see their calls."""
        return (
            fast_lora_enabled()
            and not torch.is_autocast_enabled(x.device.type)
            and x.dtype in FAST_DTYPES
            and self.lora_A.weight.dtype in FAST_DTYPES
            and type(self.lora_A) is nn.Linear
            and type(self.lora_B) is nn.Linear
            and not _has_hooks(self.lora_A, self.lora_B, self.dropout)
        )

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float] | None:
        """(A, B, s) when this adapter adds exactly ``s·B·A·x`` (forward not overridden, no dropout
        active, no hooks), else None; mixed batches stack such adapters (:mod:`peftkit.ops.multi_lora`)."""
        dropping = isinstance(self.dropout, nn.Dropout) and self.dropout.training
        if (
            type(self).forward is not LoraLinear.forward
            or dropping
            or not self._fast_path_applies(self.lora_A.weight)
        ):
            return None
        return self.lora_A.weight, self.lora_B.weight, self.scaling

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
        if init is False:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_channels)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, base: nn.Module, x: Tensor, base_output: Tensor) -> Tensor:
        """x: (batch, in_channels, *spatial); base_output: (batch, out_channels, *spatial_out)."""
        x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        return base_output + update.to(base_output.dtype)

    def delta_weight(self) -> Tensor:
        """ΔW: (out_channels, in_channels, *kernel)."""
        return conv_delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)


def _pattern_value(pattern: Mapping[str, Any], module_name: str, default: Any) -> Any:
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


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
    from torch.nn.modules import module as module_state

    if module_state._global_forward_hooks or module_state._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
