"""Which rows each optimizer step trains on, on which process: the data order of a run.

Each epoch is a seeded permutation of the training rows; step ``s`` takes the global batch
``batch_size x grad_accum x processes`` at its place in its epoch's permutation, and each process takes
its micro-batches of it. The order depends on the step number alone, so ``--resume`` continues it
exactly with no sampler state.
"""

from __future__ import annotations

import torch

from peftkit.foundation.errors import UsageError

__all__ = ["BatchOrder"]


class BatchOrder:
    """The seeded data order of a run (see the module docstring).

    Args:
        rows: training rows.
        batch_size: rows per micro-batch and process.
        grad_accum: micro-batches per step.
        world: processes.
        rank: this process.
        seed: the run's seed.

    Raises:
        UsageError: fewer rows than one global batch.
    """

    def __init__(self, rows: int, batch_size: int, grad_accum: int, world: int, rank: int, seed: int) -> None:
        self.rows, self.batch_size, self.grad_accum = rows, batch_size, grad_accum
        self.world, self.rank, self.seed = world, rank, seed
        self.global_batch_size = batch_size * grad_accum * world
        if rows < self.global_batch_size:
            raise UsageError(
                f"{rows} training rows are fewer than one global batch ({self.global_batch_size} = "
                f"batch_size {batch_size} x grad_accum {grad_accum} x {world} processes); lower batch_size"
            )
        self.steps_per_epoch = rows // self.global_batch_size
        self._permutation: dict[int, list[int]] = {}  # the current epoch's row order

    def global_batch(self, step: int) -> list[int]:
        """Row indices of step ``step``'s global batch (steps count from 0)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch not in self._permutation:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._permutation = {epoch: torch.randperm(self.rows, generator=generator).tolist()}
        size = self.global_batch_size
        return self._permutation[epoch][position * size : (position + 1) * size]

    def micro_batches(self, indices: list[int]) -> list[list[int]]:
        """This process's ``grad_accum`` micro-batches of a global batch: micro-batch j of rank r is
        slice ``j * world + r``."""
        b, world, rank = self.batch_size, self.world, self.rank
        return [indices[(j * world + rank) * b : (j * world + rank + 1) * b] for j in range(self.grad_accum)]
