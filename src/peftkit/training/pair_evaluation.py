"""Scoring a model on held-out preference pairs: the objective's loss, reward margin and preference
accuracy, and which answer its greedy generations give.

- ``preference_accuracy``: the share of pairs whose chosen answer gets the higher implicit reward (DPO:
  ``β·(log π − log π_ref)``; ORPO, SimPO: ``β·`` the mean log-probability per token); a tie counts ½,
  so a policy equal to its reference (DPO before training) scores exactly 0.5;
- ``reward_margin``: the mean of chosen minus rejected reward;
- ``generated_chosen`` / ``generated_rejected``: on the first ``examples`` pairs, the share of greedy
  answers equal to the chosen / the rejected answer (surrounding whitespace ignored).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from peftkit.objectives.choice import PreferenceSettings
from peftkit.objectives.preference import pair_scores
from peftkit.objectives.sequences import sequence_log_probs
from peftkit.training.evaluation import ANSWER_MARGIN, generate_answers

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["evaluate_pairs"]

Collate = Callable[[Sequence[dict[str, Any]]], dict[str, Tensor]]


@torch.no_grad()
def evaluate_pairs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: datasets.Dataset,
    settings: PreferenceSettings,
    collate: Collate,
    examples: int = 50,
    max_new_tokens: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Loss, reward margin and preference accuracy on all ``rows``; generations on the first ``examples``.

    Args:
        rows: tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``references``: the
            chosen and the rejected text; for DPO ``reference_chosen`` and ``reference_rejected``).
        collate: rows → a batch (:func:`peftkit.objectives.pair_batch.collate_pairs`).
        max_new_tokens: 0 → the longest answer's token count + ``ANSWER_MARGIN``.

    Returns:
        ``{"loss", "reward_margin", "preference_accuracy", "chosen_log_prob", "rejected_log_prob"}`` (the
        last two per answer token), and with generation ``"generated_chosen"``, ``"generated_rejected"``,
        ``"scored"`` and ``"samples"`` (up to three ``{"answer", "reference", "rejected"}``).
    """
    was_training = model.training
    model.eval()
    try:
        result = _pair_scores(model, rows, settings, collate, batch_size)
        generated = min(examples, len(rows))
        if generated > 0:
            result.update(_generations(model, tokenizer, rows.select(range(generated)), max_new_tokens))
    finally:
        model.train(was_training)
    return result


def _pair_scores(
    model: nn.Module, rows: datasets.Dataset, settings: PreferenceSettings, collate: Collate, batch_size: int
) -> dict[str, Any]:
    device = next(model.parameters()).device
    totals = dict.fromkeys(("loss", "reward_margin", "preference_accuracy"), 0.0)
    log_probs = [0.0, 0.0]
    tokens = [0, 0]
    for start in range(0, len(rows), batch_size):
        chunk = list(rows.select(range(start, min(start + batch_size, len(rows)))))
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        sums, counts = sequence_log_probs(model, batch)
        scores = pair_scores(settings, sums, counts, batch.get("reference_log_probs"))
        totals["loss"] += scores.losses.sum().item()
        totals["reward_margin"] += scores.margins.sum().item()
        totals["preference_accuracy"] += scores.correct.sum().item()
        for side, (side_sums, side_counts) in enumerate(zip(sums.chunk(2), counts.chunk(2), strict=True)):
            log_probs[side] += side_sums.sum().item()
            tokens[side] += int(side_counts.sum().item())
    result: dict[str, Any] = {name: total / max(len(rows), 1) for name, total in totals.items()}
    result["chosen_log_prob"] = log_probs[0] / max(tokens[0], 1)
    result["rejected_log_prob"] = log_probs[1] / max(tokens[1], 1)
    return result


def _generations(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: datasets.Dataset, max_new_tokens: int
) -> dict[str, Any]:
    """Greedy answers to the pairs' prompts, compared with their chosen and rejected answers."""
    if max_new_tokens <= 0:
        longest = max(max(len(row["chosen_ids"]), len(row["rejected_ids"])) for row in rows)
        max_new_tokens = longest + ANSWER_MARGIN
    answers = generate_answers(model, tokenizer, rows["prompt_ids"], "causal-lm", max_new_tokens)
    chosen = [a.strip() == refs[0].strip() for a, refs in zip(answers, rows["references"], strict=True)]
    rejected = [a.strip() == refs[1].strip() for a, refs in zip(answers, rows["references"], strict=True)]
    return {
        "generated_chosen": sum(chosen) / len(answers),
        "generated_rejected": sum(rejected) / len(answers),
        "scored": len(answers),
        "samples": [
            {"answer": a, "reference": refs[0], "rejected": refs[1]}
            for a, refs in zip(answers[:3], rows["references"][:3], strict=True)
        ],
    }
