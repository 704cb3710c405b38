"""``LoraConfig``: LoRA's settings (Hugging Face PEFT's field names) and the choice of adapter per module.

The adapter a module gets is picked from :data:`VARIANTS` (DoRA, PiSSA/OLoRA: subclasses of
:class:`~peftkit.methods.lora.adapters.LoraLinear`), else by the base layer's type. A new LoRA variant is
its own file with a ``LoraLinear`` subclass, a config field that switches it on, and one row in
:data:`VARIANTS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from torch import nn

from peftkit.core.adapter_config import AdapterConfig
from peftkit.core.targeting import adaptable_modules
from peftkit.foundation.modules import is_conv1d
from peftkit.methods.default_targets import attention_targets
from peftkit.methods.lora.adapters import LoraConv, LoraEmbedding, LoraLinear, lora_scaling
from peftkit.methods.lora.dora import DoraLinear
from peftkit.methods.lora.loftq import LOFTQ_INIT, replace_lora_weights_loftq
from peftkit.methods.lora.pissa import PrincipalLoraLinear, is_principal_init

__all__ = ["VARIANTS", "LoraConfig", "LoraVariant"]

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", LOFTQ_INIT)


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
            ``"pissa"`` / ``"pissa_niter_K"`` / ``"olora"`` (:mod:`peftkit.methods.lora.pissa`), or
            ``"loftq"`` (quantized bases: A, B cancel the quantization error at the start,
            :mod:`peftkit.methods.lora.loftq`; written to files as True, the factors being a plain
            LoRA on the quantized base).
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
                "'pissa', 'pissa_niter_<iterations>', 'olora' or 'loftq'"
            )
        if self.init_lora_weights == LOFTQ_INIT and self.use_dora:
            raise ValueError(
                "LoraConfig.init_lora_weights='loftq' with use_dora=True is not supported; use one"
            )
        chosen = [f"{v.field}={getattr(self, v.field)!r}" for v in VARIANTS if v.applies(self)]
        if len(chosen) > 1:
            raise ValueError(
                f"LoraConfig.{chosen[0]} with {' and '.join(chosen[1:])} is not supported; use one"
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

    def initialize(self, model: nn.Module, adapter_name: str) -> None:
        """LoftQ (``init_lora_weights="loftq"``) once the adapter is in ``model``: it reads the base's
        float weights from where the base was loaded (:func:`replace_lora_weights_loftq`)."""
        if self.init_lora_weights == LOFTQ_INIT:
            replace_lora_weights_loftq(model, adapter_name=adapter_name)

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`AdapterConfig.to_dict`, with ``"loftq"`` written as True: LoftQ's factors are a
        plain LoRA on the quantized base (as Hugging Face PEFT's ``replace_lora_weights_loftq`` leaves
        them), and a loader must not initialise them again (Hugging Face PEFT's ``"loftq"`` would
        re-quantize the base)."""
        data = super().to_dict()
        if data["init_lora_weights"] == LOFTQ_INIT:
            data["init_lora_weights"] = True
        return data

    def is_supported(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)) or is_conv1d(module)

    def with_default_targets(self, model: nn.Module) -> LoraConfig:
        """Unset ``target_modules``: the model's attention projections (queries, keys, values and output,
        where Hugging Face PEFT's table picks queries and values only)."""
        if self.target_modules is not None:
            return self
        candidates = [name for name, module in adaptable_modules(model) if self.is_supported(module)]
        return self.replace(target_modules=attention_targets(model, candidates).target_modules)

    def build_adapter(self, module_name: str, base: nn.Module) -> nn.Module:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        scaling = lora_scaling(alpha, r, self.use_rslora)
        variant = next((variant for variant in VARIANTS if variant.applies(self)), None)
        if variant is not None:
            adapter: nn.Module = variant.adapter(base, r, scaling, self.lora_dropout)  # refuses other bases
        elif isinstance(base, nn.Embedding):
            adapter = LoraEmbedding(base, r, scaling)
        elif isinstance(base, (nn.Conv1d, nn.Conv2d)):
            adapter = LoraConv(base, r, scaling, self.lora_dropout)
        else:
            adapter = LoraLinear(base, r, scaling, self.lora_dropout)
        adapter.reset_parameters(self.init_lora_weights, base)
        return adapter


class LoraVariant(NamedTuple):
    """A LoRA variant: the ``LoraConfig`` field that switches it on and the adapter class it builds.

    Attributes:
        field: the config field (``"use_dora"``).
        selects: whether a value of that field asks for this variant.
        adapter: a :class:`LoraLinear` subclass; its constructor refuses bases it cannot adapt.
    """

    field: str
    selects: Callable[[Any], bool]
    adapter: type[LoraLinear]

    def applies(self, config: LoraConfig) -> bool:
        """Whether ``config`` asks for this variant."""
        return self.selects(getattr(config, self.field))


VARIANTS: tuple[LoraVariant, ...] = (
    LoraVariant("use_dora", lambda value: value is True, DoraLinear),
    LoraVariant("init_lora_weights", is_principal_init, PrincipalLoraLinear),  # PiSSA, OLoRA
)


def _pattern_value(pattern: Mapping[str, Any], module_name: str, default: Any) -> Any:
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
