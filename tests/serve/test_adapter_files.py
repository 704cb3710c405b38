"""Reading an adapter directory once: containment (links included), safetensors only, parsed from the bytes
read; every refusal a 400/403 naming the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from peftkit.serve.adapter_files import AdapterError, read_adapter_files, resolve_inside


@pytest.fixture
def root(tmp_path: Path, serve_files) -> Path:
    root = tmp_path / "root"
    shutil.copytree(serve_files["alpha"], root / "alpha")
    return root


def test_a_good_directory_gives_its_config_and_tensors(root: Path) -> None:
    files = read_adapter_files(root / "alpha", root)
    assert files.config["r"] == 8 and files.config["peft_type"] == "LORA"
    assert any(key.endswith("q_proj.lora_A.weight") for key in files.tensors)


def _refused(directory: Path, root: Path | None) -> AdapterError:
    with pytest.raises(AdapterError) as caught:
        read_adapter_files(directory, root)
    return caught.value


def test_links_out_of_the_root_are_refused_whoever_made_them(root: Path, serve_files, tmp_path: Path) -> None:
    weights = root / "alpha" / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(serve_files["beta"] / "adapter_model.safetensors")
    error = _refused(root / "alpha", root)
    assert error.status == 403 and "links outside the adapter root" in str(error)
    assert read_adapter_files(root / "alpha", None).tensors  # the operator's own directories: trusted
    (root / "escape").symlink_to(serve_files["beta"], target_is_directory=True)
    assert _refused(root / "escape", root).status == 403
    assert resolve_inside(root, "alpha") == (root / "alpha").resolve()
    with pytest.raises(AdapterError, match="outside the adapter root"):
        resolve_inside(root, "../..")


@pytest.mark.parametrize(
    ("damage", "status", "reason"),
    [
        ("no weights, a pickle", 400, "pickle files are never loaded"),
        ("no config", 400, "has no adapter_config.json"),
        ("config not JSON", 400, "is not valid JSON"),
        ("config a list", 400, "is not a JSON object"),
        ("config too large", 400, "larger than"),
        ("truncated weights", 400, "not a complete safetensors file"),
        ("garbage weights", 400, "not a complete safetensors file"),
        ("weights a directory", 400, "has no adapter_model.safetensors"),
        ("a NaN weight", 400, "holds NaN or inf values"),
    ],
)
def test_damaged_directories_are_refused_with_the_reason(
    root: Path, damage: str, status: int, reason: str
) -> None:
    directory = root / "alpha"
    weights, config = directory / "adapter_model.safetensors", directory / "adapter_config.json"
    if damage == "no weights, a pickle":
        weights.rename(directory / "adapter_model.bin")
    elif damage == "no config":
        config.unlink()
    elif damage == "config not JSON":
        config.write_text("{not json")
    elif damage == "config a list":
        config.write_text(json.dumps([1, 2]))
    elif damage == "config too large":
        config.write_text(json.dumps({"r": 8, "pad": "x" * (1 << 20)}))
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage weights":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "a NaN weight":
        tensors = load_file(str(weights))
        tensors[sorted(tensors)[0]][0, 0] = float("nan")
        save_file(tensors, str(weights))
    else:
        weights.unlink()
        weights.mkdir()
    error = _refused(directory, root)
    assert error.status == status and reason in str(error)
