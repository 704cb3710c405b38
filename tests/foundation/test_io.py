"""Adapter files: layout, atomic writes, and loading errors that name what is wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.foundation.errors import UsageError
from peftkit.foundation.io import atomic_write, check_overwrite, remove_path

from helpers.tiny_models import TINY_MODELS, randomize_adapters

LLAMA = TINY_MODELS[1]


def saved(tmp_path: Path, **config: object) -> Path:
    model = peftkit.wrap(LLAMA.make(), peftkit.LoraConfig(**{"r": 2, "target_modules": ["q_proj"], **config}))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_file_layout_matches_hf_peft(tmp_path: Path) -> None:
    model = peftkit.wrap(LLAMA.make(), peftkit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.add_adapter("qa", peftkit.LoraConfig(r=3, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4
    assert config["target_modules"] == ["q_proj"] and config["inference_mode"] is True
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(tensors) == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"
    }
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 32)
    sub = json.loads((tmp_path / "qa" / "adapter_config.json").read_text())
    assert sub["r"] == 3 and sub["target_modules"] == ["v_proj"]
    text = (tmp_path / "adapter_config.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_all_linear_is_saved_as_the_modules_it_resolved_to(tmp_path: Path) -> None:
    saved(tmp_path, target_modules="all-linear")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
    assert "lm_head" not in config["target_modules"]


def test_load_trainable_or_frozen(tmp_path: Path) -> None:
    saved(tmp_path)
    frozen = peftkit.load(LLAMA.make(), tmp_path)
    assert frozen.trainable_parameters()[0] == 0
    trainable = peftkit.load(LLAMA.make(), tmp_path, is_trainable=True)
    assert trainable.trainable_parameters()[0] == 2 * (2 * 32 + 32 * 2)


def test_missing_tensor_names_the_key_and_loads_nothing(tmp_path: Path) -> None:
    saved(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, str(weights))
    base = LLAMA.make()
    with pytest.raises(ValueError, match=r"missing from the file.*layers\.1\.self_attn\.q_proj\.lora_B"):
        peftkit.load(base, tmp_path)
    assert not any(".adapters." in n for n, _ in base.named_parameters()), "a failed load left adapters"


def test_unexpected_tensor_is_an_error(tmp_path: Path) -> None:
    saved(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = {k.replace("base_model.model.", ""): v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"match no module here.*model\.layers\.0"):
        peftkit.load(LLAMA.make(), tmp_path)


def test_shape_mismatch_names_the_key(tmp_path: Path) -> None:
    saved(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 4
    config_path.write_text(json.dumps(config))
    expected = r"lora_A\.weight has shape \(2, 32\) in the file but \(4, 32\) here"
    with pytest.raises(ValueError, match=expected):
        peftkit.load(LLAMA.make(), tmp_path)


def test_unknown_config_field_warns(tmp_path: Path) -> None:
    saved(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["shiny_new_option"] = 1
    config["peft_version"] = "0.21.2"
    config_path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"unknown adapter config fields: \['shiny_new_option'\]"):
        peftkit.load(LLAMA.make(), tmp_path)


def test_unimplemented_feature_is_refused(tmp_path: Path) -> None:
    saved(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_qalora"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_qalora=True"):
        peftkit.load(LLAMA.make(), tmp_path)


def test_unknown_peft_type(tmp_path: Path) -> None:
    saved(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA"}))
    with pytest.raises(ValueError, match="peft_type='VERA' is not supported"):
        peftkit.load(LLAMA.make(), tmp_path)


def test_pickle_weights_are_never_loaded(tmp_path: Path) -> None:
    saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(FileNotFoundError, match="pickle file peftkit never loads"):
        peftkit.load(LLAMA.make(), tmp_path)


def test_missing_directory_and_missing_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        peftkit.load(LLAMA.make(), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config\.json"):
        peftkit.load(LLAMA.make(), tmp_path)


def test_invalid_json_config(tmp_path: Path) -> None:
    saved(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        peftkit.load(LLAMA.make(), tmp_path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "adapter_model.safetensors"
    target.write_bytes(b"old")

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter_model.safetensors"], "temporary file left behind"


def test_save_overwrites_atomically_and_reloads(tmp_path: Path) -> None:
    model = peftkit.wrap(LLAMA.make(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model, seed=1)
    model.save_pretrained(tmp_path)
    randomize_adapters(model, seed=2)
    model.save_pretrained(tmp_path)
    loaded = peftkit.load(LLAMA.make(), tmp_path)
    ids = LLAMA.inputs()["input_ids"]
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_saved_files_get_ordinary_permissions(tmp_path: Path) -> None:
    import os

    saved(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_check_overwrite_is_the_one_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (full / "kept.txt").write_text("mine")
    check_overwrite(tmp_path / "absent", False, "OUT")
    check_overwrite(empty, False, "OUT")
    check_overwrite(full, True, "OUT")
    with pytest.raises(
        UsageError, match=r"OUT .*full exists and is not empty; pass --overwrite to replace it, or"
    ):
        check_overwrite(full, False, "OUT", ", or else")
    monkeypatch.chdir(full)
    for protected in (full, tmp_path, Path.home()):
        with pytest.raises(UsageError, match="--overwrite would delete"):
            check_overwrite(protected, True, "OUT")
    assert (full / "kept.txt").read_text() == "mine"


def test_remove_path_removes_files_and_trees(tmp_path: Path) -> None:
    tree, file = tmp_path / "tree", tmp_path / "file.txt"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("a")
    file.write_text("b")
    remove_path(tree)
    remove_path(file)
    assert not tree.exists() and not file.exists()


def test_save_pretrained_renames_each_file_into_place_with_the_umask_mode(tmp_path: Path) -> None:
    from peftkit.foundation.io import save_pretrained

    (tmp_path / "metrics.jsonl").write_text("{}\n")  # what the directory held stays
    save_pretrained([LLAMA.make()], tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "metrics.jsonl"} <= set(modes)  # and no temporary directory
    assert all(not name.startswith(".") for name in modes) and set(modes.values()) == {0o666 & ~mask}
