"""Checking an adapter against the served model: config value types, method, rank, targets, every tensor's
key, shape and values; plain LoRA becomes factors, other layer methods keep their module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from peftkit.serve.adapter_files import AdapterError, read_adapter_files
from peftkit.serve.resident import adapter_rank, build_resident
from peftkit.serve.slots import BatchContext, SlotTable


@pytest.fixture(scope="module")
def served(serve_files):
    """The tiny base with its linear layers wrapped, as the server holds it."""
    from peftkit.foundation.loading import load_model

    model = load_model(str(serve_files["base"]))[0]
    SlotTable(model, BatchContext(), 2, 8)
    return model


def _files(serve_files, tmp_path: Path, name: str = "alpha", **config_changes):
    directory = tmp_path / name
    shutil.copytree(serve_files[name], directory)
    if config_changes:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return read_adapter_files(directory, None)


def test_a_lora_adapter_becomes_its_factors_per_layer(served, serve_files, tmp_path: Path) -> None:
    resident = build_resident("alpha", _files(serve_files, tmp_path), served, max_rank=8)
    assert resident.rank == 8 and len(resident.layers) == 2 * 3  # q, v, down in two blocks
    update = resident.layers["model.layers.0.self_attn.q_proj"]
    A, B, scaling = update.factors
    assert A.shape == (8, 32) and B.shape == (32, 8) and scaling == 2.0 and update.module is None
    tensors = read_adapter_files(serve_files["alpha"], None).tensors
    torch.testing.assert_close(A, tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"r": "eight"}, "r and rank_pattern values must be positive integers"),
        ({"r": 8.5}, "r and rank_pattern values must be positive integers"),
        ({"rank_pattern": {"q_proj": "x"}}, "r and rank_pattern values must be positive integers"),
        ({"target_modules": 12}, "target_modules must be a string or a list of strings"),
        ({"target_modules": ["q_proj", 3]}, "target_modules must be a string or a list of strings"),
        ({"lora_alpha": "x"}, "lora_alpha must be a number"),
        ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern must map names to numbers"),
        ({"peft_type": "NOPE"}, "is not supported"),
        ({"use_qalora": True}, "peftkit does not implement"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "trains base biases"),
        ({"target_modules": ["embed_tokens"]}, "linear layers only"),
        ({"target_modules": ["nothing_here"]}, "matched no module"),
        ({"r": 4}, "another rank than its config says"),
    ],
)
def test_bad_configs_are_400s_naming_the_field(served, serve_files, tmp_path: Path, changes, reason) -> None:
    with pytest.raises(AdapterError, match=reason) as caught:
        build_resident("alpha", _files(serve_files, tmp_path, **changes), served, max_rank=None)
    assert caught.value.status == 400


def test_rank_shape_and_value_checks(served, serve_files, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="rank 16, above this server's --max-rank 8"):
        build_resident("wide", _files(serve_files, tmp_path, "wide"), served, max_rank=8)
    with pytest.raises(AdapterError, match="does not fit the served model"):
        build_resident("wrong", _files(serve_files, tmp_path, "wrong"), served, max_rank=None)
    files = _files(serve_files, tmp_path, "beta")
    key = next(iter(files.tensors))
    files.tensors[key] = files.tensors[key].to(torch.int32)
    with pytest.raises(AdapterError, match=r"torch\.int32 values, not floats"):
        build_resident("beta", files, served, max_rank=None)
    files = _files(serve_files, tmp_path, "gamma")
    del files.tensors[key]
    with pytest.raises(AdapterError, match="missing from the file"):
        build_resident("gamma", files, served, max_rank=None)


def test_adapter_rank_is_the_largest_of_r_and_the_rank_pattern() -> None:
    assert adapter_rank({"r": 8, "rank_pattern": {"q_proj": 32}}) == 32
    assert adapter_rank({"r": 4}) == 4
    assert adapter_rank({}) == 0
