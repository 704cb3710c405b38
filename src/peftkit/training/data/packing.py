"""Packing: several whole examples in each training row, for fewer padding tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.foundation.tasks import IGNORE_INDEX

if TYPE_CHECKING:
    import datasets

__all__ = ["pack"]


def pack(rows: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Fill rows of up to ``max_length`` tokens with whole examples, in order (no example is split).

    An example may attend to the earlier examples of its row (no attention reset), as in TRL's packing
    without position-id resets; its loss still covers its own answer only.
    """
    import datasets

    packed: dict[str, list[Any]] = {"input_ids": [], "labels": [], "targets": []}
    ids: list[int] = []
    labels: list[int] = []
    for row in rows:
        if ids and len(ids) + len(row["input_ids"]) > max_length:
            packed["input_ids"].append(ids)
            packed["labels"].append(labels)
            packed["targets"].append(sum(label != IGNORE_INDEX for label in labels))
            ids, labels = [], []
        ids = ids + row["input_ids"]
        labels = labels + row["labels"]
    if ids:
        packed["input_ids"].append(ids)
        packed["labels"].append(labels)
        packed["targets"].append(sum(label != IGNORE_INDEX for label in labels))
    return datasets.Dataset.from_dict(packed)
