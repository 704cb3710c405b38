"""``peftkit combine``: the adapter it writes, what it prints, and bad input (one line, exit 2, nothing
written). Adapters are random LoRA adapters saved on the tiny Llama of tests/helpers/tiny_lm.py.

Tolerance: 1e-6 absolute on weight updates of size ~0.1 (fp32, the same products summed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.arithmetic import COMBINATION_TYPES
from peftkit.cli import build_parser, main
from peftkit.core.layer import AdapterLayer
from peftkit.foundation.loading import load_model

from helpers.tiny_models import randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")


def save_adapter(model_dir: Path, out: Path, config: peftkit.AdapterConfig, seed: int) -> Path:
    base, _ = load_model(str(model_dir))
    model = peftkit.wrap(base, config)
    randomize_adapters(model, seed=seed, scale=0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": save_adapter(
            model_dir, root / "a", peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), 0
        ),
        "b": save_adapter(
            model_dir,
            root / "b",
            peftkit.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
            1,
        ),
        "ia3": save_adapter(model_dir, root / "ia3", peftkit.IA3Config(target_modules=["v_proj"]), 2),
    }


def deltas(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = peftkit.load(load_model(str(model_dir))[0], adapter)
    return {
        path: layer.adapters["default"].delta_weight().detach()
        for path, layer in model.model.named_modules()
        if isinstance(layer, AdapterLayer)
    }


def test_combine_writes_the_weighted_sum_and_prints_the_errors(
    model_dir: Path, adapters: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "combined"
    assert (
        main(["combine", str(out), str(adapters["a"]), str(adapters["b"]), "--weights", "0.7", "-0.3"]) == 0
    )
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in printed and "total" in printed and "(exact)" in printed
    a, b, combined = (
        deltas(model_dir, adapters["a"]),
        deltas(model_dir, adapters["b"]),
        deltas(model_dir, out),
    )
    assert set(combined) == set(b)  # a targets q_proj only: v_proj gets b's update alone
    for path, delta in combined.items():
        expected = 0.7 * a.get(path, torch.zeros_like(delta)) - 0.3 * b[path]
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=0)
    record = json.loads((out / "combination.json").read_text())
    assert record["weights"] == [0.7, -0.3] and record["method"] == "linear"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["combined"], "no staging directory is left behind"


def test_ties_with_a_seeded_fit_is_reproducible(
    model_dir: Path, adapters: dict[str, Path], tmp_path: Path, capsys
) -> None:
    argv = [str(adapters["a"]), str(adapters["b"]), "--weights", "1", "1", "--method", "dare_ties"]
    argv += ["--density", "0.5", "--rank", "2", "--seed", "3"]
    assert main(["combine", str(tmp_path / "one"), *argv]) == 0
    assert main(["combine", str(tmp_path / "two"), *argv]) == 0
    printed = capsys.readouterr().out
    assert "of the dare_ties update" in printed
    one, two = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert all(t.shape[0] == 2 for k, t in one.items() if "lora_A" in k)
    record = json.loads((tmp_path / "one" / "combination.json").read_text())
    assert 0 < record["total_relative_error"] < 1


def bad_cases(adapters: dict[str, Path], tmp_path: Path) -> list[tuple[list[str], str]]:
    a, b = str(adapters["a"]), str(adapters["b"])
    full = tmp_path / "full"
    full.mkdir(exist_ok=True)
    (full / "keep.txt").write_text("x")
    return [
        ([a, b, "--weights", "1"], "1 weights for 2 adapters"),
        ([a, b, "--weights", "1", "1", "--density", "0.5"], "--density 0.5 applies to"),
        ([a, b, "--weights", "1", "1", "--rank", "4"], "--rank 4: linear and cat are exact"),
        ([a, b, "--weights", "1", "1", "--method", "ties"], "needs the share of entries"),
        ([a, str(tmp_path / "missing"), "--weights", "1", "1"], "holds no adapter_config.json"),
        ([a, str(adapters["ia3"]), "--weights", "1", "1"], "is IA3, not LoRA; only LoRA adapters combine"),
        (["--out-dir-is-taken"], "exists and is not empty; pass --overwrite"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    case: int, adapters: dict[str, Path], tmp_path: Path, capsys
) -> None:
    argv, message = bad_cases(adapters, tmp_path)[case]
    out = tmp_path / "out"
    if argv == ["--out-dir-is-taken"]:
        out, argv = tmp_path / "full", [str(adapters["a"]), "--weights", "1"]
    before = sorted(tmp_path.rglob("*"))
    assert main(["combine", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftkit combine: error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_adapters_of_different_bases_need_model(
    model_dir: Path, adapters: dict[str, Path], tmp_path: Path, capsys
) -> None:
    moved = tmp_path / "moved"
    moved.mkdir()
    config = json.loads((adapters["b"] / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "elsewhere"}))
    (moved / "adapter_model.safetensors").write_bytes(
        (adapters["b"] / "adapter_model.safetensors").read_bytes()
    )
    argv = ["combine", str(tmp_path / "out"), str(adapters["a"]), str(moved), "--weights", "1", "1"]
    assert main(argv) == 2
    assert "record different base models" in capsys.readouterr().err
    assert main([*argv, "--model", str(model_dir)]) == 0


@pytest.mark.parametrize("method", COMBINATION_TYPES)
def test_the_command_offers_every_combination_type_add_weighted_adapter_takes(method: str) -> None:
    args = build_parser().parse_args(["combine", "out", "a", "--weights", "1", "--method", method])
    assert args.method == method
