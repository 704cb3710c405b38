"""peftkit.training.loop.order: the seeded data order, split over steps, processes and micro-batches."""

from __future__ import annotations

import pytest
import torch

from peftkit.foundation.errors import UsageError
from peftkit.training.loop.order import BatchOrder


def test_each_epoch_is_a_permutation_sliced_into_global_batches() -> None:
    order = BatchOrder(rows=26, batch_size=2, grad_accum=3, world=2, rank=0, seed=5)
    assert (order.global_batch_size, order.steps_per_epoch) == (12, 2)  # 2 rows of 26 left over per epoch
    first = order.global_batch(0) + order.global_batch(1)
    second = order.global_batch(2) + order.global_batch(3)
    assert len(set(first)) == len(set(second)) == 24 and set(first) <= set(range(26))
    assert first != second  # a new permutation each epoch
    again = BatchOrder(rows=26, batch_size=2, grad_accum=3, world=2, rank=0, seed=5)
    assert again.global_batch(3) == order.global_batch(3)  # the step alone decides: resume needs no state
    other_seed = BatchOrder(rows=26, batch_size=2, grad_accum=3, world=2, rank=0, seed=6)
    assert other_seed.global_batch(0) != order.global_batch(0)


def test_processes_take_disjoint_micro_batches_that_cover_the_global_batch() -> None:
    orders = [BatchOrder(rows=40, batch_size=2, grad_accum=3, world=2, rank=rank, seed=0) for rank in (0, 1)]
    indices = orders[0].global_batch(1)
    parts = [order.micro_batches(indices) for order in orders]
    assert all(len(micro) == 3 and all(len(batch) == 2 for batch in micro) for micro in parts)
    # micro-batch j of rank r is slice j * world + r
    assert parts[0][1] == indices[4:6] and parts[1][1] == indices[6:8]
    taken = [row for micro in parts for batch in micro for row in batch]
    assert sorted(taken) == sorted(indices)


def test_fewer_rows_than_one_global_batch_is_refused() -> None:
    with pytest.raises(
        UsageError, match=r"6 training rows are fewer than one global batch \(8 = batch_size 2"
    ):
        BatchOrder(rows=6, batch_size=2, grad_accum=2, world=2, rank=0, seed=0)


def padding(lengths: list[int], batches: list[list[int]]) -> int:
    """Padding tokens of ``batches`` padded to their longest row (computed here, independently)."""
    return sum(
        len(batch) * max(lengths[i] for i in batch) - sum(lengths[i] for i in batch) for batch in batches
    )


def test_length_buckets_keep_every_row_once_and_cut_the_padding() -> None:
    lengths = [int(n) for n in torch.randint(20, 500, (403,), generator=torch.Generator().manual_seed(1))]
    plain = BatchOrder(rows=403, batch_size=4, grad_accum=1, world=1, rank=0, seed=3)
    bucketed = BatchOrder(rows=403, batch_size=4, grad_accum=1, world=1, rank=0, seed=3, lengths=lengths)
    steps = range(bucketed.steps_per_epoch)  # 100: 3 rows left over
    batches = [bucketed.global_batch(step) for step in steps]
    rows = [row for batch in batches for row in batch]
    assert len(rows) == len(set(rows)) == 400  # every row once, 3 left over
    random_padding = padding(lengths, [plain.global_batch(step) for step in steps])
    assert padding(lengths, batches) < 0.1 * random_padding  # 50 batches sorted together: similar lengths
    again = BatchOrder(rows=403, batch_size=4, grad_accum=1, world=1, rank=0, seed=3, lengths=lengths)
    assert again.global_batch(57) == batches[57]  # still decided by the step alone (resume)
    sizes = [max(lengths[i] for i in batch) for batch in batches[:50]]
    assert sizes != sorted(sizes)  # the batches come in a shuffled order, not shortest first
