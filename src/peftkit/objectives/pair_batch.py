"""A batch of preference pairs as model inputs: :func:`collate_pairs`, and the attention mask of
pairs that share their prompt (:func:`pair_attention_mask`).

Each pair is ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (the answers' tokens after the prompt).
Two layouts, the same scored tokens:

- **shared prompt** (one row per pair): ``prompt | chosen | rejected``; the rejected answer's positions
  restart where the prompt ends and it attends to the prompt and itself, never to the chosen answer
  (``segments`` say which part each token is; the model gets a 4-D mask from them). The prompt is
  computed once instead of twice.
- **two rows per pair**: ``prompt | chosen`` for every pair, then ``prompt | rejected``, as TRL
  batches them; for models whose attention takes no custom mask (sliding windows, soft prompts).

Either way the batch says which hidden state predicts which answer token: ``score_positions`` (flat
indices into ``rows × width``), ``score_tokens`` and ``score_sequences`` (0 … pairs − 1: the chosen
answers, then pairs … 2·pairs − 1: the rejected ones), with ``answer_lengths`` per sequence. A row of
several pairs (packing) would be more groups in ``segments``; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["BRANCHES", "PAD_SEGMENT", "collate_pairs", "pair_attention_mask"]

BRANCHES = 3  # segment = BRANCHES · pair-in-row + branch; branch 0: prompt, 1: chosen, 2: rejected
PAD_SEGMENT = -1


def collate_pairs(rows: Sequence[dict[str, Any]], pad_id: int, shared_prompt: bool) -> dict[str, Tensor]:
    """Right-padded model inputs for pairs, and which positions score which answer tokens.

    Args:
        rows: dicts with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of ints, answers not
            empty) and, for DPO, ``reference_chosen`` and ``reference_rejected`` (floats).
        shared_prompt: one row per pair (``prompt | chosen | rejected``) instead of two.

    Returns:
        ``input_ids``, ``attention_mask`` (1 on real tokens), (rows, width); with ``shared_prompt``
        also ``position_ids`` and ``segments`` (rows, width); ``score_positions``, ``score_tokens``,
        ``score_sequences`` (answer tokens,); ``answer_lengths`` (2 · pairs,); and
        ``reference_log_probs`` (2 · pairs,) when the rows carry them.
    """
    pieces = _shared_rows(rows) if shared_prompt else _separate_rows(rows)
    tokens, positions, segments, scored = pieces
    width = max(len(ids) for ids in tokens)
    batch = {
        "input_ids": _padded(tokens, width, pad_id),
        "attention_mask": _padded([[1] * len(ids) for ids in tokens], width, 0),
    }
    if shared_prompt:
        batch["position_ids"] = _padded(positions, width, 0)
        batch["segments"] = _padded(segments, width, PAD_SEGMENT)
    flat = [(row * width + index, token, sequence) for row, index, token, sequence in scored]
    batch["score_positions"], batch["score_tokens"], batch["score_sequences"] = (
        torch.tensor(column, dtype=torch.long) for column in zip(*flat, strict=True)
    )
    lengths = [len(row["chosen_ids"]) for row in rows] + [len(row["rejected_ids"]) for row in rows]
    batch["answer_lengths"] = torch.tensor(lengths, dtype=torch.long)
    if "reference_chosen" in rows[0]:
        references = [row["reference_chosen"] for row in rows] + [row["reference_rejected"] for row in rows]
        batch["reference_log_probs"] = torch.tensor(references, dtype=torch.float32)
    return batch


Scored = list[tuple[int, int, int, int]]  # (row, index of the predicting position, token, sequence)


def _shared_rows(
    rows: Sequence[dict[str, Any]],
) -> tuple[list[list[int]], list[list[int]], list[list[int]], Scored]:
    """``prompt | chosen | rejected`` per row, the rejected answer's positions restarting after the prompt."""
    tokens, positions, segments, scored = [], [], [], []
    pairs = len(rows)
    for i, row in enumerate(rows):
        prompt, chosen, rejected = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
        p, c = len(prompt), len(chosen)
        tokens.append([*prompt, *chosen, *rejected])
        positions.append([*range(p + c), *range(p, p + len(rejected))])
        segments.append([0] * p + [1] * c + [2] * len(rejected))
        # answer token t is predicted by the token before it: the prompt's last for t = 0
        scored += [(i, p - 1 if t == 0 else p + t - 1, token, i) for t, token in enumerate(chosen)]
        scored += [
            (i, p - 1 if t == 0 else p + c + t - 1, token, pairs + i) for t, token in enumerate(rejected)
        ]
    return tokens, positions, segments, scored


def _separate_rows(
    rows: Sequence[dict[str, Any]],
) -> tuple[list[list[int]], list[list[int]], list[list[int]], Scored]:
    """``prompt | chosen`` for every pair, then ``prompt | rejected``: two rows per pair."""
    tokens, scored = [], []
    answers = [("chosen_ids", row) for row in rows] + [("rejected_ids", row) for row in rows]
    for i, (key, row) in enumerate(answers):
        prompt, answer = row["prompt_ids"], row[key]
        tokens.append([*prompt, *answer])
        scored += [(i, len(prompt) - 1 + t, token, i) for t, token in enumerate(answer)]
    return tokens, [], [], scored


def _padded(rows: list[list[int]], width: int, value: int) -> Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def pair_attention_mask(segments: Tensor, additive_dtype: torch.dtype | None = None) -> Tensor:
    """The attention mask of shared-prompt rows: token i sees token j ≤ i of its own pair when j is in
    the prompt or in i's own answer; padding sees only itself (so no row of the mask is empty).

    Args:
        segments: (rows, width) from :func:`collate_pairs`.
        additive_dtype: None for a boolean mask (True: attend; ``scaled_dot_product_attention``), or a
            float dtype for an additive one (0 or the dtype's minimum; eager attention).

    Returns:
        (rows, 1, width, width).
    """
    width = segments.shape[1]
    group, branch = segments.div(BRANCHES, rounding_mode="floor"), segments.remainder(BRANCHES)
    real = segments != PAD_SEGMENT
    query, key = (slice(None), slice(None), None), (slice(None), None, slice(None))  # (rows, i, j)
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    same_pair = group[query] == group[key]
    visible_part = (branch[key] == 0) | (branch[key] == branch[query])
    allowed = causal & same_pair & visible_part & real[query] & real[key]
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device)
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=additive_dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(additive_dtype).min)
