"""The training objectives by name and the options each takes (no torch: the command line reads this).

- ``sft``: the token cross-entropy of the answers (supervised fine-tuning);
- ``dpo``: Direct Preference Optimization (Rafailov et al., 2023) against a frozen reference: the base
  model with the adapter off, or ``reference`` (an adapter directory, e.g. an SFT run); ``rpo_alpha`` > 0
  adds the chosen answer's NLL per token (RPO, Pang et al., 2024);
- ``orpo``: Odds Ratio Preference Optimization (Hong et al., 2024): the chosen answer's NLL plus
  ``beta`` times an odds-ratio term; no reference;
- ``simpo``: Simple Preference Optimization (Meng et al., 2024): a margin ``simpo_gamma`` between the
  length-normalised log-probabilities scaled by ``beta``; no reference (``cpo_alpha`` > 0 adds the
  chosen answer's NLL, TRL's CPO-SimPO).

Option names are TRL's (``DPOConfig``, ``ORPOConfig``, ``CPOConfig``); the defaults are TRL's, except
SimPO's ``beta`` (2.0, the SimPO paper's; TRL's CPO default 0.1 is CPO's) and ``cpo_alpha`` (0: plain
SimPO; TRL's CPO default 1.0 adds the NLL). ``rpo_alpha`` is the name TRL's ``DPOConfig`` used up to
0.x; TRL 1.16 writes it ``loss_type=["sigmoid", "sft"], loss_weights=[1, rpo_alpha]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "OBJECTIVES",
    "OBJECTIVE_OPTIONS",
    "OPTION_HELP",
    "OPTION_NAMES",
    "PREFERENCE_OBJECTIVES",
    "PreferenceSettings",
    "objectives_taking",
]

OBJECTIVES = ("sft", "dpo", "orpo", "simpo")
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo")

# objective -> {option: default}; an option missing from an objective's row is refused for it
OBJECTIVE_OPTIONS: dict[str, dict[str, Any]] = {
    "sft": {},
    "dpo": {"beta": 0.1, "rpo_alpha": 0.0, "reference": None},
    "orpo": {"beta": 0.1},
    "simpo": {"beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0},
}

OPTION_NAMES = ("beta", "simpo_gamma", "cpo_alpha", "rpo_alpha", "reference")  # every objective's options

OPTION_HELP = {
    "beta": "preference strength: DPO's KL weight (default 0.1), ORPO's odds-ratio weight lambda "
    "(0.1), SimPO's reward scale (2.0)",
    "simpo_gamma": "simpo: the target reward margin gamma (default 0.5)",
    "cpo_alpha": "simpo: weight of the chosen answer's NLL added to the loss (default 0: plain SimPO)",
    "rpo_alpha": "dpo: weight of the chosen answer's NLL per token added to the loss (RPO; TRL's "
    "rpo_alpha, in TRL 1.x loss_type [sigmoid, sft]) (default 0: plain DPO)",
    "reference": "dpo: the reference policy, an adapter directory (e.g. an SFT run) on the same base; it "
    "is also where the trained adapter starts. Default: the base model with the adapter off",
}


def objectives_taking(option: str) -> list[str]:
    """The objectives that take ``option``."""
    return [name for name, options in OBJECTIVE_OPTIONS.items() if option in options]


@dataclass(frozen=True)
class PreferenceSettings:
    """A preference objective and its numbers, resolved (defaults filled in).

    Attributes:
        objective: ``dpo``, ``orpo`` or ``simpo``.
        beta: see :data:`OPTION_HELP`.
        simpo_gamma: SimPO's margin (unused otherwise).
        cpo_alpha: SimPO's NLL weight (unused otherwise).
        rpo_alpha: DPO's NLL weight (unused otherwise).
    """

    objective: str
    beta: float
    simpo_gamma: float = 0.0
    cpo_alpha: float = 0.0
    rpo_alpha: float = 0.0

    @classmethod
    def of(cls, objective: str, **given: Any) -> PreferenceSettings:
        """The settings of ``objective`` with ``given`` options (None: the default).

        Raises:
            ValueError: not a preference objective, or an option it does not take.
        """
        if objective not in PREFERENCE_OBJECTIVES:
            raise ValueError(f"objective {objective!r} is not one of {list(PREFERENCE_OBJECTIVES)}")
        defaults = OBJECTIVE_OPTIONS[objective]
        numbers = {k: v for k, v in given.items() if v is not None and k != "reference"}
        unknown = sorted(set(numbers) - set(defaults))
        if unknown:
            raise ValueError(f"objective {objective!r} takes no {', '.join(unknown)}")
        values = {k: float(numbers.get(k, v)) for k, v in defaults.items() if k != "reference"}
        return cls(objective=objective, **values)

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares with a reference policy (DPO)."""
        return self.objective == "dpo"
