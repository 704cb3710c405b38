"""Build one LoRA adapter from weighted combinations of others, module by module.

:func:`combine_lora_adapters` reads the LoRA factors of the named adapters from a wrapped model, combines
their weight updates ΔWᵢ = sᵢ·BᵢAᵢ with :mod:`peftkit.arithmetic.maths`, and returns what
``PeftModel.add_weighted_adapter`` adds: a :class:`~peftkit.methods.lora.config.LoraConfig` whose
scaling is 1 on every module (``lora_alpha = r``, per-module ranks in ``rank_pattern`` /
``alpha_pattern``), the adapter's tensors under their file keys, and a :class:`CombinationReport`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftkit.arithmetic.maths import LowRankFit, combine_deltas, concatenate_factors, low_rank_fit
from peftkit.arithmetic.settings import Combination
from peftkit.core.adapter_config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.foundation.io import KEY_PREFIX
from peftkit.methods.lora.adapters import LoraConv, LoraEmbedding, LoraLinear
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.pissa import PrincipalLoraLinear

__all__ = ["CombinationReport", "combine_lora_adapters", "lora_factors"]


@dataclass(frozen=True)
class CombinationReport:
    """What a combination built: the rank and the fit's relative error of every module, and in total.

    The error of a module is ‖T − B·A‖_F / ‖T‖_F, where T is the update the combination type defines
    (``Σ wᵢ·ΔWᵢ`` for ``svd``; the TIES / DARE / pruned update for those types) and B·A the new
    adapter's update; 0 for ``linear`` and ``cat`` (exact) and for a zero T. The total is
    ``sqrt(Σ‖T − B·A‖²) / sqrt(Σ‖T‖²)`` over all modules.

    Attributes:
        combination_type: the type used.
        ranks: module path → rank of the new adapter there.
        errors: module path → relative error.
        total_error: the relative error over all modules together.
    """

    combination_type: str
    ranks: dict[str, int]
    errors: dict[str, float]
    total_error: float

    def table(self) -> str:
        """One line per module (path, rank, relative error), then the total."""
        width = max((len(path) for path in self.ranks), default=6)
        lines = [f"{'module':<{width}}  rank  relative error"]
        lines += [f"{path:<{width}}  {self.ranks[path]:>4}  {self.errors[path]:.3e}" for path in self.ranks]
        lines.append(f"{'total':<{width}}  {'':>4}  {self.total_error:.3e}")
        return "\n".join(lines)


def lora_factors(adapter: nn.Module) -> tuple[Tensor, Tensor, float]:
    """The factors of a LoRA adapter's update as matrices: ``ΔW = s·B·A`` with ΔW flattened to
    ``(out, in·kernel)`` in the (out, in) orientation (a ``Conv1D``'s and an embedding's transposed).

    A PiSSA/OLoRA adapter adds ``s·(B·A − B₀·A₀)``: its factors are ``[A; A₀]`` and ``[B, −B₀]``.

    Returns:
        ``(A: (r, in), B: (out, r), s)`` as float32 tensors detached from the adapter.

    Raises:
        TypeError: not a LoRA adapter peftkit can combine.
    """
    if isinstance(adapter, LoraEmbedding):
        A, B = adapter.lora_embedding_A, adapter.lora_embedding_B  # (r, vocab), (dim, r)
    elif isinstance(adapter, PrincipalLoraLinear):
        A = torch.cat([adapter.lora_A.weight, adapter.initial_A], dim=0)  # (2r, in)
        B = torch.cat([adapter.lora_B.weight, -adapter.initial_B], dim=1)  # (out, 2r)
    elif type(adapter) in (LoraLinear, LoraConv):
        A, B = adapter.lora_A.weight.flatten(1), adapter.lora_B.weight.flatten(1)  # (r, in·k), (out, r)
    else:
        raise TypeError(f"{type(adapter).__name__} is not a LoRA adapter that can be combined")
    return A.detach().float(), B.detach().float(), float(adapter.scaling)


def combine_lora_adapters(
    model: nn.Module, configs: Mapping[str, AdapterConfig], adapters: Sequence[str], combination: Combination
) -> tuple[LoraConfig, dict[str, Tensor], CombinationReport]:
    """The LoRA adapter combining ``adapters`` of ``model`` as ``combination`` says; see
    ``PeftModel.add_weighted_adapter`` for the settings.

    A module that only some of the adapters target counts as a zero update for the others. The rank at
    a module is the sum of the adapters' ranks there for ``linear`` / ``cat``, else ``svd_rank`` or
    (unset) the largest of their ranks there, at most ``min(out, in)``.

    Args:
        model: the base model with peftkit's wrappers inside (``PeftModel.model``).
        configs: adapter name → config, for every adapter of ``model``.
        adapters: the names to combine, one per weight of ``combination``.

    Returns:
        ``(config, tensors, report)``: the new adapter's config, its tensors under their file keys
        (``base_model.model.<module>.lora_A.weight`` …), and the ranks and errors.

    Raises:
        ValueError: bad arguments (named with the value and the accepted ones), or an adapter that is
            not a plain or PiSSA/OLoRA LoRA adapter (DoRA, IA³, prompts, bottleneck …), trains biases
            or has ``modules_to_save``.
    """
    if isinstance(adapters, str) or not adapters:
        raise ValueError(f"adapters={adapters!r} must be a non-empty list of adapter names")
    combination.check(len(adapters))
    _check_sources(configs, adapters)
    seed = combination.seed
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tensors: dict[str, Tensor] = {}
    fits: dict[str, LowRankFit] = {}
    for path, layer in model.named_modules():
        if not isinstance(layer, AdapterLayer):
            continue
        present = [
            (name, w) for name, w in zip(adapters, combination.weights, strict=True) if name in layer.adapters
        ]
        if not present:
            continue
        fit = fits[path] = _combine_module(layer, present, combination, generator)
        a_key, b_key, a_shape, b_shape = _file_layout(layer.adapters[present[0][0]], fit.A.shape[0])
        tensors[f"{KEY_PREFIX}{path}.{a_key}"] = fit.A.reshape(a_shape)
        tensors[f"{KEY_PREFIX}{path}.{b_key}"] = fit.B.reshape(b_shape)
    if not fits:
        raise ValueError(f"adapters {list(adapters)} adapt no module of this model; nothing to combine")
    ranks = {path: fit.A.shape[0] for path, fit in fits.items()}
    residual_sq = sum(fit.residual_norm**2 for fit in fits.values())
    target_sq = sum(fit.target_norm**2 for fit in fits.values())
    total = math.sqrt(residual_sq / target_sq) if target_sq > 0 else 0.0
    config = _combined_config([configs[name] for name in adapters], ranks)
    errors = {path: fit.relative_error for path, fit in fits.items()}
    return config, tensors, CombinationReport(combination.combination_type, ranks, errors, total)


def _combine_module(
    layer: AdapterLayer,
    present: list[tuple[str, float]],
    combination: Combination,
    generator: torch.Generator | None,
) -> LowRankFit:
    """The combined factors at one layer of the ``(adapter name, weight)`` pairs that adapt it, with
    their fit (both norms 0 for an exact combination: no fit, no error)."""
    factors = [lora_factors(layer.adapters[name]) for name, _ in present]
    used = [w for _, w in present]
    if combination.exact:
        return LowRankFit(*concatenate_factors(factors, used), residual_norm=0.0, target_norm=0.0)
    target = combine_deltas(
        combination.combination_type,
        [s * b @ a for a, b, s in factors],  # (out, in) each
        used,
        combination.density,
        combination.majority_sign_method,
        generator,
    )
    rank = combination.svd_rank or max(_rank(layer.adapters[name]) for name, _ in present)
    return low_rank_fit(target, rank, combination.svd_clamp)


def _check_sources(configs: Mapping[str, AdapterConfig], adapters: Sequence[str]) -> None:
    """Refuse unknown adapters and any that is not plain LoRA (rsLoRA, patterns, PiSSA/OLoRA included)."""
    unknown = [name for name in adapters if name not in configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(configs)}")
    for name in adapters:
        config = configs[name]
        if not isinstance(config, LoraConfig) or config.use_dora:
            kind = "DoRA" if isinstance(config, LoraConfig) else config.peft_type
            raise ValueError(
                f"adapter {name!r} is {kind}: only LoRA adapters (plain, rsLoRA, PiSSA/OLoRA) combine, "
                "because the combination is defined on their weight updates s·B·A"
            )
        if config.modules_to_save or config.bias != "none":
            raise ValueError(
                f"adapter {name!r} also trains {'modules_to_save' if config.modules_to_save else 'biases'}, "
                "which have no low-rank update to combine; combine adapters without them"
            )


def _rank(adapter: nn.Module) -> int:
    """The rank the adapter was configured with (a PiSSA adapter's r, not the 2r of its factors)."""
    A = adapter.lora_embedding_A if isinstance(adapter, LoraEmbedding) else adapter.lora_A.weight
    return A.shape[0]


def _file_layout(adapter: nn.Module, rank: int) -> tuple[str, str, tuple[int, ...], tuple[int, ...]]:
    """(A's key, B's key, A's shape, B's shape) of a rank-``rank`` adapter like ``adapter``."""
    if isinstance(adapter, LoraEmbedding):
        A, B = adapter.lora_embedding_A, adapter.lora_embedding_B
        a_key, b_key = "lora_embedding_A", "lora_embedding_B"
    else:
        A, B = adapter.lora_A.weight, adapter.lora_B.weight
        a_key, b_key = "lora_A.weight", "lora_B.weight"
    return a_key, b_key, (rank, *A.shape[1:]), (B.shape[0], rank, *B.shape[2:])


def _combined_config(sources: Sequence[AdapterConfig], ranks: Mapping[str, int]) -> LoraConfig:
    """A plain LoRA config for ``ranks`` with scaling 1 everywhere: ``r`` the most common rank,
    ``lora_alpha = r``, and the other modules' ranks (and equal alphas) as patterns of their exact path."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    others = {re.escape(path): rank for path, rank in ranks.items() if rank != r}
    first = sources[0]

    def shared(field: str) -> str | None:
        values = {getattr(source, field) for source in sources}
        return values.pop() if len(values) == 1 else None

    return LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=others,
        alpha_pattern=dict(others),
        target_modules=list(ranks),
        lora_dropout=first.lora_dropout if isinstance(first, LoraConfig) else 0.0,
        task_type=shared("task_type"),
        base_model_name_or_path=shared("base_model_name_or_path"),
    )
