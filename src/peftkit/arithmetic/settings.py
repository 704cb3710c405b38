"""What a combination of adapters asks for, checked before any work: the types, and :class:`Combination`
(``add_weighted_adapter``'s arguments after the adapter names). No torch here: ``peftkit combine``
reads its choices and checks its flags from this module before a model loads."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["COMBINATION_TYPES", "DENSITY_TYPES", "EXACT_TYPES", "SIGN_METHODS", "SIGN_TYPES", "Combination"]

COMBINATION_TYPES = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
#: Exact: the new factors are the old ones concatenated, ΔW = Σ wᵢ·ΔWᵢ with no fit.
EXACT_TYPES = ("linear", "cat")
#: Types that read ``density`` (the share of entries each task vector keeps).
DENSITY_TYPES = tuple(t for t in COMBINATION_TYPES if t.startswith(("ties", "dare", "magnitude_prune")))
#: Types that elect a sign per entry (``majority_sign_method``).
SIGN_TYPES = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Combination:
    """How to combine adapters: one weight per adapter and Hugging Face PEFT's settings (see
    ``PeftModel.add_weighted_adapter``), plus ``seed`` for DARE's random drop."""

    weights: Sequence[float]
    combination_type: str = "svd"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int | None = None

    @property
    def exact(self) -> bool:
        """Whether the combination is exact (``linear``, ``cat``: no fit, no error)."""
        return self.combination_type in EXACT_TYPES

    def check(self, adapter_count: int) -> None:
        """Refuse settings that do not fit together, or a weight count other than ``adapter_count``.

        Raises:
            ValueError: naming the argument, its value and what is accepted: an unknown type, a weight
                count other than ``adapter_count``, a non-finite weight, ``svd_rank`` / ``svd_clamp``
                with an exact type, ``density`` missing or outside (0, 1] for the types that read it
                (or given to one that does not), an unknown ``majority_sign_method`` or one given to a
                type without sign election.
        """
        if self.combination_type not in COMBINATION_TYPES:
            raise ValueError(
                f"combination_type={self.combination_type!r} must be one of {list(COMBINATION_TYPES)}"
            )
        weights = self.weights
        if len(weights) != adapter_count:
            raise ValueError(
                f"{len(weights)} weights for {adapter_count} adapters; give one weight per adapter"
            )
        if not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
        ):
            raise ValueError(f"weights={list(weights)!r} must be finite numbers (negative ones subtract)")
        self._check_fit()
        self._check_density()
        self._check_sign_method()

    def _check_fit(self) -> None:
        rank, clamp = self.svd_rank, self.svd_clamp
        if rank is not None and (self.exact or not isinstance(rank, int) or rank <= 0):
            raise ValueError(
                f"svd_rank={rank!r}: linear and cat are exact (rank = the sum of the ranks); "
                "use an svd type to choose the rank"
                if self.exact
                else f"svd_rank={rank!r} must be a positive integer"
            )
        if clamp is not None and (self.exact or not 0 < clamp <= 1):
            raise ValueError(
                f"svd_clamp={clamp!r}: linear and cat have no fit to clamp"
                if self.exact
                else f"svd_clamp={clamp!r} must be a quantile in (0, 1]"
            )

    def _check_density(self) -> None:
        density, kind = self.density, self.combination_type
        if kind in DENSITY_TYPES:
            if density is None or not 0 < density <= 1:
                raise ValueError(
                    f"density={density!r}: combination_type={kind!r} needs the share of entries "
                    "each update keeps, in (0, 1] (e.g. 0.5)"
                )
        elif density is not None:
            raise ValueError(
                f"density={density!r} applies to {list(DENSITY_TYPES)} only, not combination_type={kind!r}"
            )

    def _check_sign_method(self) -> None:
        method = self.majority_sign_method
        if method not in SIGN_METHODS:
            raise ValueError(f"majority_sign_method={method!r} must be one of {list(SIGN_METHODS)}")
        if method != "total" and self.combination_type not in SIGN_TYPES:
            raise ValueError(
                f"majority_sign_method={method!r} applies to {list(SIGN_TYPES)} only, not "
                f"combination_type={self.combination_type!r}"
            )
