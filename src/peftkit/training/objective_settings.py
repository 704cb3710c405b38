"""A run's objective settings: each objective's options filled in, and checked against the run.

``TrainConfig`` holds ``objective`` and the options of every objective (``beta``, ``simpo_gamma``,
``cpo_alpha``, ``rpo_alpha``, ``reference``; None: the objective's default, :data:`peftkit.objectives.choice.
OBJECTIVE_OPTIONS`). An option given to an objective that does not take it is refused, never ignored.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from peftkit.foundation.errors import UsageError
from peftkit.objectives.choice import OBJECTIVE_OPTIONS, OPTION_NAMES, objectives_taking

if TYPE_CHECKING:
    from peftkit.training.train_config import TrainConfig

__all__ = ["PREFERENCE_METRICS", "check_objective", "with_objective_defaults"]

PREFERENCE_METRICS = ("auto", "preference_accuracy", "loss")  # what a preference run scores


def with_objective_defaults(config: TrainConfig) -> TrainConfig:
    """``config`` with its objective's unset options at their defaults (``beta: 0.1`` for DPO…)."""
    defaults = OBJECTIVE_OPTIONS[config.objective]
    return dataclasses.replace(
        config, **{name: value for name, value in defaults.items() if getattr(config, name) is None}
    )


def check_objective(config: TrainConfig, source: str) -> None:
    """An objective's options only with it; what a preference objective cannot run with.

    Raises:
        UsageError: one line naming the setting, ``source`` and the way out.
    """
    taken = OBJECTIVE_OPTIONS[config.objective]
    for name in OPTION_NAMES:
        if getattr(config, name) is not None and name not in taken:
            takers = objectives_taking(name)
            named = ", ".join(takers[:-1]) + (" or " if len(takers) > 1 else "") + takers[-1]
            raise UsageError(
                f"{name} (from {source}) is an option of objective {named}, not of {config.objective!r}: "
                f"add --objective {takers[0]} or leave {name} out"
            )
    for name, meaning in (
        ("beta", lambda v: v > 0),
        ("cpo_alpha", lambda v: v >= 0),
        ("rpo_alpha", lambda v: v >= 0),
    ):
        value = getattr(config, name)
        if value is not None and not meaning(value):
            raise UsageError(
                f"{name}={value!r} (from {source}) must be {'positive' if name == 'beta' else '0 or more'}"
            )
    if config.objective == "sft":
        return
    what = f"objective {config.objective!r} (from {source})"
    if config.task != "causal-lm":
        raise UsageError(
            f"{what} trains causal language models: task {config.task!r} is not one; use causal-lm"
        )
    if config.packing or config.padding_free:
        flag = "--packing" if config.packing else "--padding-free"
        raise UsageError(f"{what}: packing of preference pairs is not built yet; drop {flag}")
    if config.metric not in PREFERENCE_METRICS:
        raise UsageError(
            f"metric={config.metric!r} (from {source}) scores answers; {what} is scored by "
            f"{', '.join(PREFERENCE_METRICS[1:])}: use metric auto"
        )
