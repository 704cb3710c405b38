"""Packing: several whole examples in each training row, each example attending only to itself.

A packed row is its examples' tokens one after another plus their ``lengths``: the boundaries from
which :mod:`~peftkit.training.data.batching` derives position ids restarting at 0 for every example
and the segment offsets (``cu_seq_lens``) that keep attention inside each example
(:mod:`peftkit.objectives.packed`). Each example's first label is ignored: in the row it would be
predicted from the previous example's last token, and alone it is never predicted at all. So every
example's loss and gradients are those it has alone.

Rows are filled by best-fit decreasing (:func:`best_fit_decreasing`): examples from the longest down,
each into the open row it fills most tightly, in O(n log max_length) (a segment tree over the rows'
free space). Any layout of token rows (preference pairs, say) can pack with :func:`pack_columns`.
Padding-free batches (:func:`padding_free`) are packed rows of one example each: a batch of them is
its examples laid end to end, the very batches of padded rows without the padding.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from itertools import accumulate, chain
from typing import TYPE_CHECKING, Any

from peftkit.foundation.errors import UsageError
from peftkit.foundation.tasks import IGNORE_INDEX

if TYPE_CHECKING:
    import datasets

__all__ = ["best_fit_decreasing", "pack", "pack_columns", "padding_free"]


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group items into bins of at most ``capacity``: the longest first, each into the fullest bin it
    still fits (a new bin when none has room).

    Ties go to the earlier item and to the bin opened first, so the result depends on ``lengths`` alone.

    Args:
        lengths: each item's size, 1 to ``capacity``.
        capacity: a bin's size.

    Returns:
        The indices of ``lengths`` in each bin, in the order they went in; bins in the order opened.

    Raises:
        ValueError: an item of size 0 or larger than ``capacity``.
    """
    if any(not 0 < n <= capacity for n in lengths):
        raise ValueError(f"every length must be in [1, {capacity}]")
    free = _FreeSpace(capacity)
    bins: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[index]
        target = free.take_at_least(size)  # a bin with the least free space that still fits
        if target is None:
            target = len(bins)
            bins.append([])
            free.add(target, capacity - size)
        else:
            free.add(target, free.space_of(target) - size)
        bins[target].append(index)
    return bins


class _FreeSpace:
    """Open bins by free space: a segment tree over 0..capacity counting the bins with each amount,
    and a heap of bin indices per amount; :meth:`take_at_least` finds the smallest amount ≥ a size in
    O(log capacity), and the earliest opened bin with it in O(log bins)."""

    def __init__(self, capacity: int) -> None:
        self.leaves = 1 << max(capacity, 1).bit_length()  # > capacity
        self.count = [0] * (2 * self.leaves)
        self.at: list[list[int]] = [[] for _ in range(capacity + 1)]
        self.space: dict[int, int] = {}

    def space_of(self, bin_index: int) -> int:
        return self.space[bin_index]

    def add(self, bin_index: int, space: int) -> None:
        """Make ``bin_index`` available with ``space`` free (a full bin is never offered again)."""
        self.space[bin_index] = space
        if space == 0:
            return
        heapq.heappush(self.at[space], bin_index)
        self._change(space, 1)

    def take_at_least(self, size: int) -> int | None:
        """Remove and return the bin with the least free space ≥ ``size`` (the earliest opened of
        those), or None."""
        node = size + self.leaves
        while not self.count[node]:  # climb past right children, then step to the right neighbour
            while node & 1:
                node >>= 1
            if node == 0:
                return None
            node += 1
        while node < self.leaves:  # descend to the leftmost non-empty leaf
            node = 2 * node if self.count[2 * node] else 2 * node + 1
        space = node - self.leaves
        bin_index = heapq.heappop(self.at[space])
        self._change(space, -1)
        return bin_index

    def _change(self, space: int, delta: int) -> None:
        node = space + self.leaves
        while node:
            self.count[node] += delta
            node >>= 1


def pack_columns(
    columns: Mapping[str, Sequence[Sequence[int]]], lengths: Sequence[int], capacity: int | None
) -> dict[str, list[Any]]:
    """Pack token rows of any layout: every column's rows of one bin concatenated, and the bin's
    ``lengths``.

    Args:
        columns: equally long lists of token lists (``input_ids``, ``labels``, ...), row i of each
            ``lengths[i]`` long. A ``labels`` column gets :data:`IGNORE_INDEX` at each row's first
            token (see the module docstring).
        lengths: each row's token count.
        capacity: the most tokens in a packed row; None: each row alone, in order (padding-free).

    Returns:
        The packed columns, plus ``lengths`` (each packed row's example lengths, in order) and
        ``examples`` (the indices of the rows it holds).
    """
    bins = [[i] for i in range(len(lengths))] if capacity is None else best_fit_decreasing(lengths, capacity)
    packed: dict[str, list[Any]] = {name: [] for name in columns}
    packed["lengths"] = [[lengths[i] for i in members] for members in bins]
    packed["examples"] = bins
    for name, rows in columns.items():
        packed[name] = [list(chain.from_iterable(rows[i] for i in members)) for members in bins]
    if "labels" in packed:
        for labels, sizes in zip(packed["labels"], packed["lengths"], strict=True):
            for start in accumulate(sizes[:-1], initial=0):
                labels[start] = IGNORE_INDEX
    return packed


def pack(rows: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Training rows (``input_ids``, ``labels``) packed into rows of up to ``max_length`` tokens.

    Returns:
        A data set with ``input_ids``, ``labels``, ``lengths`` (the examples in each row),
        ``examples`` (their indices in ``rows``) and ``targets`` (each row's scored labels).

    Raises:
        UsageError: no rows to pack.
    """
    return _packed(rows, max_length)


def padding_free(rows: datasets.Dataset) -> datasets.Dataset:
    """Training rows (``input_ids``, ``labels``) as packed rows of one example each, in order: batches
    of them are the batches of padded rows laid end to end, with no padding. Columns as :func:`pack`.

    Raises:
        UsageError: no rows.
    """
    return _packed(rows, None)


def _packed(rows: datasets.Dataset, capacity: int | None) -> datasets.Dataset:
    import datasets

    if len(rows) == 0:
        raise UsageError("packing found no training example to pack; check the data and max_length")
    columns = {"input_ids": rows["input_ids"], "labels": rows["labels"]}
    packed = pack_columns(columns, [len(ids) for ids in columns["input_ids"]], capacity)
    packed["targets"] = [sum(label != IGNORE_INDEX for label in labels) for labels in packed["labels"]]
    return datasets.Dataset.from_dict(packed)
