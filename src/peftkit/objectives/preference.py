"""DPO, ORPO and SimPO: pure functions of per-sequence log-probabilities, and the preference objective.

For a pair (prompt x, chosen answer y_w, rejected answer y_l), with ``log π(y|x)`` summed over the
answer's tokens and ``|y|`` its token count:

- **DPO** (Rafailov et al., 2023, eq. 7): ``−log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) −
  log π_ref(y_l))])``; implicit reward ``β·(log π(y) − log π_ref(y))``. TRL's ``loss_type="sigmoid"``.
  With ``rpo_alpha`` > 0, plus ``rpo_alpha`` times the chosen answer's mean NLL ``−log π(y_w)/|y_w|``
  (RPO, Pang et al., 2024; TRL's ``rpo_alpha``, in TRL 1.16 ``loss_type=["sigmoid", "sft"]`` with
  ``loss_weights=[1, rpo_alpha]``). TRL averages that NLL over the batch's chosen tokens; here it is each
  pair's mean, as for ORPO (the same when a batch's chosen answers are equally long).
- **ORPO** (Hong et al., 2024, eqs. 4–7): ``−log π(y_w)/|y_w| − λ·log σ(log odds(y_w) − log odds(y_l))``
  with ``odds(y) = p/(1 − p)`` of the length-normalised ``p = exp(log π(y)/|y|)``; reward
  ``β·log π(y)/|y|`` (β is λ). TRL averages the NLL over the batch's chosen tokens; here it is each
  pair's mean (the paper's), which is what lets any split of a batch give the same gradient.
- **SimPO** (Meng et al., 2024, eq. 6): ``−log σ(β·(log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ)``, plus
  ``cpo_alpha`` times the chosen answer's mean NLL (TRL's CPO-SimPO; 0 by default); reward
  ``β·log π(y)/|y|``.

:func:`preference_objective` is the :class:`~peftkit.objectives.Objective` of a batch of pairs: the
summed per-pair losses and the number of pairs, with the reward margins and accuracies of the pairs it
saw kept for the training log (:meth:`PreferenceObjective.take_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.objectives.choice import PreferenceSettings
from peftkit.objectives.sequences import sequence_log_probs

__all__ = [
    "PairScores",
    "PreferenceObjective",
    "dpo_losses",
    "log1mexp",
    "orpo_losses",
    "pair_scores",
    "preference_objective",
    "simpo_losses",
]

LOG_HALF = -math.log(2.0)


def dpo_losses(
    chosen: Tensor, rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor, beta: float
) -> Tensor:
    """DPO's per-pair loss ``−log σ(β·(chosen log-ratio − rejected log-ratio))``.

    Args:
        chosen, rejected: (pairs,) the policy's summed answer log-probabilities.
        reference_chosen, reference_rejected: (pairs,) the reference's.

    Returns:
        (pairs,); ``ln 2`` where the policy equals the reference.
    """
    logits = (chosen - reference_chosen) - (rejected - reference_rejected)
    return -F.logsigmoid(beta * logits)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, without cancellation (split at ``−ln 2``; Mächler, 2012)."""
    return torch.where(x < LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(chosen_mean: Tensor, rejected_mean: Tensor, beta: float) -> Tensor:
    """ORPO's per-pair loss: the chosen answer's mean NLL minus ``beta · log σ(log odds ratio)``.

    Args:
        chosen_mean, rejected_mean: (pairs,) mean log-probability per answer token (< 0).

    Returns:
        (pairs,).
    """
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return -chosen_mean - beta * F.logsigmoid(log_odds)


def simpo_losses(
    chosen_mean: Tensor, rejected_mean: Tensor, beta: float, gamma: float, cpo_alpha: float = 0.0
) -> Tensor:
    """SimPO's per-pair loss ``−log σ(β·(chosen mean − rejected mean) − γ)`` (+ ``cpo_alpha`` × NLL).

    Args:
        chosen_mean, rejected_mean: (pairs,) mean log-probability per answer token.

    Returns:
        (pairs,).
    """
    losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    return losses - cpo_alpha * chosen_mean if cpo_alpha else losses


@dataclass(frozen=True)
class PairScores:
    """Per-pair results of a preference objective: (pairs,) each."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    @property
    def margins(self) -> Tensor:
        """Chosen minus rejected implicit reward."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def correct(self) -> Tensor:
        """1 where the chosen answer's reward is higher, ½ on a tie (no preference), else 0."""
        return (self.margins > 0).float() + 0.5 * (self.margins == 0).float()


def pair_scores(
    settings: PreferenceSettings, sums: Tensor, counts: Tensor, reference: Tensor | None = None
) -> PairScores:
    """The losses and implicit rewards of a batch of pairs from their answers' log-probabilities.

    Args:
        sums: (2 · pairs,) summed log-probabilities: the chosen answers, then the rejected ones.
        counts: (2 · pairs,) answer tokens, in the same order.
        reference: (2 · pairs,) the reference's summed log-probabilities (DPO only).

    Raises:
        ValueError: DPO without ``reference``.
    """
    chosen, rejected = sums.float().chunk(2)
    beta = settings.beta
    if settings.objective == "dpo":
        if reference is None:
            raise ValueError("dpo needs the reference's log-probabilities")
        reference_chosen, reference_rejected = reference.float().chunk(2)
        losses = dpo_losses(chosen, rejected, reference_chosen, reference_rejected, beta)
        if settings.rpo_alpha:
            losses = losses - settings.rpo_alpha * chosen / counts.chunk(2)[0].clamp(min=1)
        rewards = beta * (chosen - reference_chosen), beta * (rejected - reference_rejected)
        return PairScores(losses, *(r.detach() for r in rewards))
    chosen_mean, rejected_mean = (sums.float() / counts.clamp(min=1)).chunk(2)
    if settings.objective == "orpo":
        losses = orpo_losses(chosen_mean, rejected_mean, beta)
    else:
        losses = simpo_losses(chosen_mean, rejected_mean, beta, settings.simpo_gamma, settings.cpo_alpha)
    return PairScores(losses, (beta * chosen_mean).detach(), (beta * rejected_mean).detach())


class PreferenceObjective:
    """A preference loss as an :class:`~peftkit.objectives.Objective` of a batch of pairs.

    ``objective(model, batch)`` returns ``(summed per-pair loss, pairs)``; ``batch`` is what
    :func:`peftkit.training.data.pairs.collate_pairs` makes (with ``reference_log_probs`` for DPO). The
    pairs' summed reward margins and accuracies (ties count ½) accumulate until :meth:`take_metrics`.
    """

    def __init__(self, settings: PreferenceSettings) -> None:
        self.settings = settings
        self._sums: dict[str, Tensor] = {}

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        sums, counts = sequence_log_probs(model, batch)
        scores = pair_scores(self.settings, sums, counts, batch.get("reference_log_probs"))
        self._add("reward_margin", scores.margins.sum())
        self._add("reward_accuracy", scores.correct.sum())
        return scores.losses.sum(), torch.tensor(len(scores.losses), device=scores.losses.device)

    def _add(self, name: str, value: Tensor) -> None:
        self._sums[name] = self._sums[name] + value if name in self._sums else value

    def take_metrics(self) -> dict[str, Tensor]:
        """The per-pair metrics summed since the last call (0-dim tensors), and start again."""
        sums, self._sums = self._sums, {}
        return sums


def preference_objective(settings: PreferenceSettings) -> PreferenceObjective:
    """The :class:`PreferenceObjective` of ``settings``."""
    return PreferenceObjective(settings)
