"""Which rows each optimizer step trains on, on which process: the data order of a run.

Each epoch is a seeded permutation of the training rows; step ``s`` takes the global batch
``batch_size x grad_accum x processes`` at its place in its epoch's permutation, and each process takes
its micro-batches of it. The order depends on the step number alone, so ``--resume`` continues it
exactly with no sampler state.

With the rows' lengths given (length buckets: for rows that are padded, where packing does not
apply), each stretch of :data:`BUCKET_WINDOW` global batches of the permutation is sorted by length,
cut into global batches, and those are shuffled (seeded): a batch then holds rows of similar lengths,
so little of it is padding, while the batches still come in a random order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peftkit.foundation.errors import UsageError

__all__ = ["BUCKET_WINDOW", "BatchOrder"]

BUCKET_WINDOW = 50  # global batches sorted by length together (Hugging Face's group_by_length: 50)


class BatchOrder:
    """The seeded data order of a run (see the module docstring).

    Args:
        rows: training rows.
        batch_size: rows per micro-batch and process.
        grad_accum: micro-batches per step.
        world: processes.
        rank: this process.
        seed: the run's seed.
        lengths: each row's length, to batch rows of similar lengths (see the module docstring);
            None: plain random batches.
        what: what a row is, for the error message ("training rows", "packed rows").

    Raises:
        UsageError: fewer rows than one global batch.
    """

    def __init__(
        self,
        rows: int,
        batch_size: int,
        grad_accum: int,
        world: int,
        rank: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        what: str = "training rows",
    ) -> None:
        self.rows, self.batch_size, self.grad_accum = rows, batch_size, grad_accum
        self.world, self.rank, self.seed = world, rank, seed
        self.lengths = lengths
        self.global_batch_size = batch_size * grad_accum * world
        if rows < self.global_batch_size:
            raise UsageError(
                f"{rows} {what} are fewer than one global batch ({self.global_batch_size} = "
                f"batch_size {batch_size} x grad_accum {grad_accum} x {world} processes); lower batch_size"
            )
        self.steps_per_epoch = rows // self.global_batch_size
        self._permutation: dict[int, list[int]] = {}  # the current epoch's row order

    def global_batch(self, step: int) -> list[int]:
        """Row indices of step ``step``'s global batch (steps count from 0)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch not in self._permutation:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            permutation = torch.randperm(self.rows, generator=generator).tolist()
            if self.lengths is not None:
                permutation = self._bucketed(permutation, generator)
            self._permutation = {epoch: permutation}
        size = self.global_batch_size
        return self._permutation[epoch][position * size : (position + 1) * size]

    def micro_batches(self, indices: list[int]) -> list[list[int]]:
        """This process's ``grad_accum`` micro-batches of a global batch: micro-batch j of rank r is
        slice ``j * world + r``."""
        b, world, rank = self.batch_size, self.world, self.rank
        return [indices[(j * world + rank) * b : (j * world + rank + 1) * b] for j in range(self.grad_accum)]

    def _bucketed(self, permutation: list[int], generator: torch.Generator) -> list[int]:
        """``permutation`` with each window of :data:`BUCKET_WINDOW` global batches sorted by length,
        cut into global batches and shuffled; the rows short of a whole global batch stay last (unused)."""
        assert self.lengths is not None
        size = self.global_batch_size
        used = len(permutation) - len(permutation) % size
        window = size * BUCKET_WINDOW
        order: list[int] = []
        for start in range(0, used, window):
            rows = sorted(permutation[start : min(start + window, used)], key=self.lengths.__getitem__)
            batches = [rows[i : i + size] for i in range(0, len(rows), size)]
            for i in torch.randperm(len(batches), generator=generator).tolist():
                order += batches[i]
        return order + permutation[used:]
