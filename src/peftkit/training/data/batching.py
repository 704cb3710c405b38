"""Batching: tokenized rows as tensors, padded (:func:`collate`) or packed (:func:`collate_packed`)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from peftkit.foundation.tasks import IGNORE_INDEX

__all__ = ["collate", "collate_packed", "position_ids"]


def collate(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding), each (batch, seq).

    Classification rows (an integer label) give ``labels`` of shape (batch,).
    """
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        attention_mask[i, : len(row["input_ids"])] = 1
    if isinstance(rows[0]["labels"], int):
        labels = torch.tensor([row["labels"] for row in rows])
    else:
        width_labels = max(len(row["labels"]) for row in rows)
        labels = torch.full((len(rows), width_labels), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(rows: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """Packed rows (``input_ids``, ``labels``, ``lengths``: see ``packing.pack``) laid end to end as
    one sequence with no padding: ``input_ids``, ``labels``, ``position_ids`` (1, tokens), positions
    restarting at 0 for every example, and ``cu_seq_lens`` (examples + 1,) int32, the examples' offsets.
    """
    lengths = list(chain.from_iterable(row["lengths"] for row in rows))
    input_ids = torch.tensor(list(chain.from_iterable(row["input_ids"] for row in rows)))
    labels = torch.tensor(list(chain.from_iterable(row["labels"] for row in rows)))
    offsets = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return {
        "input_ids": input_ids[None],
        "labels": labels[None],
        "position_ids": position_ids(lengths)[None],
        "cu_seq_lens": offsets,
    }


def position_ids(lengths: Sequence[int]) -> Tensor:
    """Positions 0, 1, ... restarting for each of the examples of ``lengths``: (sum(lengths),) int64."""
    total = sum(lengths)
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)  # (examples,) each example's first token
    return torch.arange(total) - torch.repeat_interleave(starts, torch.tensor(list(lengths)))
