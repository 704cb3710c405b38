"""peftkit.training.data.packing and the packed side of batching and prepare: best-fit decreasing, packed
rows with their boundaries, padding-free rows, one packed sequence per micro-batch, and when a run packs."""

from __future__ import annotations

import random

import datasets
import pytest
import torch

from peftkit.foundation.errors import UsageError
from peftkit.foundation.tasks import IGNORE_INDEX
from peftkit.training.data import collate_packed, pack_training_rows, position_ids
from peftkit.training.data.packing import best_fit_decreasing, pack, pack_columns, padding_free
from peftkit.training.data.prepare import PreparedData, padded_fill
from peftkit.training.train_config import load_config


def reference_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook algorithm, quadratic: longest first; each item into the open bin with the least room
    that still fits it (the first such bin on ties), else a new bin."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[index]]
        if fits:
            best = min(fits, key=lambda b: (room[b], b))
        else:
            best = len(bins)
            bins.append([])
            room.append(capacity)
        bins[best].append(index)
        room[best] -= lengths[index]
    return bins


def test_best_fit_decreasing_by_hand() -> None:
    # 7 opens bin 0 (room 3); 5 does not fit: bin 1 (room 5); 4 fits bin 1 only; 2 fits bin 0 (room 3)
    assert best_fit_decreasing([5, 4, 7, 2], 10) == [[2, 3], [0, 1]]
    # equal sizes: the earliest open bin with the least room, until full
    assert best_fit_decreasing([3] * 6, 10) == [[0, 1, 2], [3, 4, 5]]
    assert best_fit_decreasing([], 10) == []


@pytest.mark.parametrize("seed", range(6))
def test_best_fit_decreasing_equals_the_textbook_algorithm(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.choice([16, 100, 768])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 300))]
    bins = best_fit_decreasing(lengths, capacity)
    assert bins == reference_best_fit_decreasing(lengths, capacity)
    assert sorted(i for members in bins for i in members) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in members) <= capacity for members in bins)


def test_best_fit_decreasing_fills_bins_of_many_small_items() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 200) for _ in range(5000)]
    bins = best_fit_decreasing(lengths, 768)
    assert sum(lengths) / (len(bins) * 768) > 0.99


@pytest.mark.parametrize("bad", [[0], [11], [3, -1]])
def test_best_fit_decreasing_refuses_sizes_outside_the_capacity(bad: list[int]) -> None:
    with pytest.raises(ValueError, match=r"every length must be in \[1, 10\]"):
        best_fit_decreasing(bad, 10)


def test_pack_concatenates_whole_examples_and_ignores_each_first_label() -> None:
    rows = datasets.Dataset.from_dict(
        {
            "input_ids": [[1] * 5, [2] * 4, [3] * 7, [4] * 2],
            "labels": [[-100, 1, 1, 1, 1], [2] * 4, [3] * 7, [4, -100]],
        }
    )
    packed = pack(rows, max_length=10)  # bins by best-fit decreasing: [7, 2] and [5, 4]
    assert packed["examples"] == [[2, 3], [0, 1]]
    assert packed["lengths"] == [[7, 2], [5, 4]]
    assert packed["input_ids"] == [[3] * 7 + [4] * 2, [1] * 5 + [2] * 4]
    assert packed["labels"] == [
        [IGNORE_INDEX] + [3] * 6 + [IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, 1, 1, 1, 1, IGNORE_INDEX, 2, 2, 2],
    ]
    assert packed["targets"] == [6, 7]


def test_pack_of_no_rows_is_one_line() -> None:
    empty = datasets.Dataset.from_dict({"input_ids": [], "labels": []})
    with pytest.raises(UsageError, match="packing found no training example"):
        pack(empty, max_length=10)


def test_padding_free_keeps_each_example_alone_in_its_order() -> None:
    rows = datasets.Dataset.from_dict(
        {"input_ids": [[1] * 5, [2] * 4, [3] * 7], "labels": [[-100, 1, 1, 1, 1], [2] * 4, [3] * 7]}
    )
    free = padding_free(rows)
    assert free["examples"] == [[0], [1], [2]]
    assert free["lengths"] == [[5], [4], [7]]
    assert free["input_ids"] == rows["input_ids"]
    assert free["labels"] == [[IGNORE_INDEX, 1, 1, 1, 1], [IGNORE_INDEX, 2, 2, 2], [IGNORE_INDEX] + [3] * 6]
    assert free["targets"] == [4, 3, 6]
    batch = collate_packed(list(free.select([0, 1])))  # a batch of two: the two end to end
    assert batch["input_ids"].tolist() == [[1] * 5 + [2] * 4]
    assert batch["cu_seq_lens"].tolist() == [0, 5, 9]


def test_pack_columns_packs_any_layout_of_token_rows() -> None:
    """What another data layout (preference pairs, say) calls: any columns, boundaries returned."""
    columns = {"input_ids": [[1, 2], [3, 4, 5], [6]], "chosen_mask": [[0, 1], [0, 0, 1], [1]]}
    packed = pack_columns(columns, [2, 3, 1], capacity=4)
    assert packed == {
        "input_ids": [[3, 4, 5, 6], [1, 2]],
        "chosen_mask": [[0, 0, 1, 1], [0, 1]],
        "lengths": [[3, 1], [2]],
        "examples": [[1, 2], [0]],
    }


def test_position_ids_restart_for_every_example() -> None:
    assert position_ids([3, 1, 2]).tolist() == [0, 1, 2, 0, 0, 1]
    assert position_ids([4]).tolist() == [0, 1, 2, 3]


def test_collate_packed_lays_rows_end_to_end_with_offsets_and_no_padding() -> None:
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "lengths": [2, 2]},
        {"input_ids": [9, 10, 11], "labels": [-100, 10, 11], "lengths": [3]},
    ]
    batch = collate_packed(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "cu_seq_lens"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, -100, 10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1, 2]]
    assert batch["cu_seq_lens"].tolist() == [0, 2, 4, 7]
    assert batch["cu_seq_lens"].dtype == torch.int32


def test_padded_fill_is_the_share_of_real_tokens_in_padded_batches() -> None:
    assert padded_fill([4, 4, 4, 4], batch_size=2, seed=0) == 1.0
    # one batch of two: 1 + 3 real tokens in 2 x 3
    assert padded_fill([1, 3], batch_size=2, seed=0) == pytest.approx(4 / 6)
    assert padded_fill([], batch_size=2, seed=0) == 1.0


def prepared(lengths: list[int]) -> PreparedData:
    ids = [[1] * n for n in lengths]
    train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "targets": [n - 1 for n in lengths]})
    return PreparedData(train, None, {"examples": len(lengths), "truncated": 0, "dropped": 0})


def test_a_run_packs_by_default_where_padding_would_waste_a_tenth() -> None:
    varied, even = prepared([10, 60, 20, 64, 5, 33, 47, 12]), prepared([60, 62, 64, 61])
    config = load_config(None, {"data": "x.jsonl", "max_length": 64, "batch_size": 2})
    packed = pack_training_rows(varied, config, blocker=None)
    assert packed.packed and packed.stats["packed_rows"] == len(packed.train) < 8
    assert packed.packing.startswith("on (padded batches would be")
    unpacked = pack_training_rows(even, config, blocker=None)
    assert not unpacked.packed and "padded batches would be 9" in unpacked.packing
    assert unpacked.train is even.train
    forced = pack_training_rows(even, config.replace(packing=True), blocker=None)
    assert forced.packed and len(forced.train) == 4  # no two fit in 64 tokens
    off = pack_training_rows(varied, config.replace(packing=False), blocker=None)
    assert not off.packed and off.packing == "off (--no-packing)"


def test_packing_where_it_cannot_apply_is_one_line_and_off_by_default() -> None:
    config = load_config(None, {"data": "x.jsonl", "max_length": 64})
    data = prepared([10, 60, 20, 64])
    quiet = pack_training_rows(data, config, blocker="task 'seq-cls' is not causal-lm")
    assert not quiet.packed and quiet.packing == "off (task 'seq-cls' is not causal-lm)"
    with pytest.raises(UsageError, match=r"^packing cannot apply here: task 'seq-cls' is not causal-lm; "):
        pack_training_rows(data, config.replace(packing=True), blocker="task 'seq-cls' is not causal-lm")


def test_padding_free_keeps_the_rows_wins_over_packing_and_refuses_a_blocker_in_one_line() -> None:
    varied = prepared([10, 60, 20, 64, 5, 33, 47, 12])
    config = load_config(None, {"data": "x.jsonl", "max_length": 64, "batch_size": 2, "padding_free": True})
    free = pack_training_rows(varied, config, blocker=None)
    assert free.packed and free.padding_free and free.lengths == varied.lengths
    assert free.stats["packed_rows"] == 8 and free.train["examples"] == [[i] for i in range(8)]
    assert free.packing.startswith("padding-free: each batch's examples end to end")
    for packing in (True, False):  # padding-free wins (a YAML's packing: true, say, and --padding-free)
        assert pack_training_rows(varied, config.replace(packing=packing), blocker=None).padding_free
    with pytest.raises(UsageError, match=r"^padding-free batches cannot apply here: task 'seq-cls' is not"):
        pack_training_rows(varied, config, blocker="task 'seq-cls' is not causal-lm")
