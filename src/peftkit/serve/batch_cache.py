"""The running batch's KV cache: one left-padded row per request; rows join and leave between steps.

A request's keys and values are computed by its own prefill (batch of one, its own adapter) and then
live in one row of the batch's tensors; the attention mask keeps every row to its own positions, so a
row never reads another request's cache, and nothing is shared across requests or adapters (no prefix
cache). Rows are left-padded: the newest position is the last column for every row, which is what a
transformers model expects of a batched cache (one ``cache_position`` for the batch).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["attention_mask", "check_supported", "drop_rows", "join_row"]


def check_supported(cache: object) -> None:
    """Refuse a cache whose layers are not plain growing layers (sliding windows, static caches).

    Raises:
        ValueError: a layer of another kind, named.
    """
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [])}
    if not kinds or kinds != {DynamicLayer.__name__}:
        raise ValueError(
            f"peftkit serve batches models whose KV cache is a plain DynamicCache; this model's cache has "
            f"layers of kind {sorted(kinds)} (sliding-window or hybrid attention is not supported yet)"
        )


def _pad_left(tensor: Tensor, columns: int) -> Tensor:
    """tensor: (batch, heads, seq, head_dim) → (batch, heads, columns + seq, head_dim), zeros in front."""
    if columns == 0:
        return tensor
    batch, heads, _, dim = tensor.shape
    return torch.cat([tensor.new_zeros(batch, heads, columns, dim), tensor], dim=2)


def join_row(batch: object | None, row: object) -> object:
    """Append a request's cache (batch of one) to the batch's cache as its last row.

    Args:
        batch: the batch's ``DynamicCache`` (keys/values (batch, heads, seq, head_dim) per layer), or
            None when no request runs.
        row: the new request's ``DynamicCache`` after its prefill: (1, heads, prompt_len, head_dim).

    Returns:
        The batch's cache (changed in place), or ``row`` itself when there was no batch. The shorter
        side is left-padded with zeros to the longer one's length.
    """
    if batch is None:
        return row
    for mine, theirs in zip(batch.layers, row.layers, strict=True):
        length = max(mine.keys.shape[2], theirs.keys.shape[2])
        mine.keys = torch.cat(
            [
                _pad_left(mine.keys, length - mine.keys.shape[2]),
                _pad_left(theirs.keys, length - theirs.keys.shape[2]),
            ]
        )
        mine.values = torch.cat(
            [
                _pad_left(mine.values, length - mine.values.shape[2]),
                _pad_left(theirs.values, length - theirs.values.shape[2]),
            ]
        )
    return batch


def drop_rows(batch: object, keep: list[int], longest: int) -> object | None:
    """Keep only the rows ``keep`` of the batch's cache, and only its last ``longest`` columns.

    Args:
        batch: the batch's ``DynamicCache``.
        keep: the row indices of the requests that go on, in their new order.
        longest: the longest cached length among them: the padding columns before it are dropped.

    Returns:
        The cache (changed in place), or None when no row is left.
    """
    if not keep:
        return None
    rows = torch.tensor(keep, dtype=torch.long, device=batch.layers[0].keys.device)
    for layer in batch.layers:
        layer.keys = layer.keys.index_select(0, rows)[:, :, -longest:]
        layer.values = layer.values.index_select(0, rows)[:, :, -longest:]
    return batch


def attention_mask(lengths: list[int], columns: int, device: torch.device) -> Tensor:
    """The left-padded mask for a batch: (batch, columns), 1 on each row's last ``lengths[i]`` columns."""
    positions = torch.arange(columns, device=device)  # (columns,)
    starts = columns - torch.tensor(lengths, device=device)  # (batch,)
    return (positions[None, :] >= starts[:, None]).long()
