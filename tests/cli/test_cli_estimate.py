"""``peftkit estimate`` and ``peftkit train --estimate-only``: the numbers are those of
:func:`peftkit.memory.estimate` called directly with the same settings; bad input is exit 2 and one line
on stderr; nothing is written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import peftkit
from peftkit import memory
from peftkit.cli import main
from peftkit.memory import GIB, estimate, format_estimate
from peftkit.training.method_choice import build_method_config

from helpers.tiny_lm import tiny_llama_config


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama as config.json only (the estimate reads no weights)."""
    path = tmp_path_factory.mktemp("tiny-llama-config")
    tiny_llama_config().save_pretrained(path)
    return path


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"peftkit {command}: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------ peftkit estimate
# peftkit estimate's defaults are peftkit train's: its LoRA (r=8, alpha 16, attention) and batch shape
DEFAULTS = {
    "r": 8,
    "lora_alpha": 16,
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "batch": 8,
    "seq": 512,
}
SETTINGS = [
    # (flags, the same settings as estimate()'s arguments, over DEFAULTS)
    ([], {}),
    (
        ["--r", "4", "--targets", "q_proj,v_proj", "--batch", "2", "--seq", "16"],
        {"r": 4, "targets": ["q_proj", "v_proj"], "batch": 2, "seq": 16},
    ),
    (
        ["--dtype", "bfloat16", "--optimizer", "sgd", "--grad-checkpointing", "--lora-dropout", "0.1"],
        {"dtype": "bfloat16", "optimizer": "sgd", "grad_checkpointing": True, "lora_dropout": 0.1},
    ),
    (
        ["--optimizer", "adamw8bit", "--batch", "3", "--seq", "64"],
        {"optimizer": "adamw8bit", "batch": 3, "seq": 64},
    ),
]


@pytest.mark.parametrize(("flags", "kwargs"), SETTINGS)
def test_estimate_json_is_the_estimate_of_the_same_settings(config_dir, flags, kwargs, capsys) -> None:
    assert main(["estimate", str(config_dir), *flags, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = estimate(str(config_dir), **{**DEFAULTS, **kwargs})
    assert printed == json.loads(json.dumps(expected.to_dict()))
    assert printed["full"]["peak"] > printed["peft"]["peak"]
    assert printed["full"]["trainable_parameters"] == expected.total_parameters


def test_estimate_takes_train_flag_names_and_its_loss(config_dir, capsys) -> None:
    flags = [
        "--target-modules",
        "q_proj",
        "--batch-size",
        "2",
        "--max-length",
        "16",
        "--gradient-checkpointing",
    ]
    assert main(["estimate", str(config_dir), *flags, "--loss", "fused", "--padded", "--json"]) == 0
    expected = estimate(
        str(config_dir),
        targets=["q_proj"],
        batch=2,
        seq=16,
        grad_checkpointing=True,
        loss="fused",
        padded=True,
    )
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(expected.to_dict()))


def test_estimate_prints_full_and_lora_side_by_side(config_dir, capsys) -> None:
    flags = ["--r", "4", "--targets", "q_proj,v_proj", "--batch", "2", "--seq", "16"]
    assert main(["estimate", str(config_dir), *flags]) == 0
    out = capsys.readouterr().out
    expected = estimate(str(config_dir), r=4, targets=["q_proj", "v_proj"], batch=2, seq=16)
    assert out.rstrip("\n") == format_estimate(expected)
    titles = out.splitlines()[1]
    assert re.fullmatch(r"\s+full fine-tuning\s+lora r=4 \(q_proj, v_proj\)", titles), titles
    peak = next(line for line in out.splitlines() if line.startswith("peak "))
    assert peak.count("x weights") == 2
    assert f"({expected.full.weights_multiple:.1f}x weights)" in peak
    assert f"({expected.peft.weights_multiple:.1f}x weights)" in peak


def test_estimate_device_memory_says_what_fits(config_dir, capsys) -> None:
    result = estimate(str(config_dir), **DEFAULTS)
    between = f"{(result.full.peak + result.peft.peak) / 2 / GIB:.6f}"  # LoRA fits, full does not
    assert main(["estimate", str(config_dir), "--device-memory", between]) == 0
    row = capsys.readouterr().out.splitlines()[-2]
    assert re.fullmatch(r"in \S+ GiB\s+does not fit\s+fits", row), row
    expected = estimate(str(config_dir), **DEFAULTS, device_memory=float(between))
    assert (expected.fits(expected.full), expected.fits(expected.peft)) == (False, True)
    assert main(["estimate", str(config_dir), "--device-memory", "1000"]) == 0
    assert re.fullmatch(r"in 1e\+03 GiB\s+fits\s+fits", capsys.readouterr().out.splitlines()[-2])


def test_estimate_bad_dtype_is_a_usage_error(config_dir, capsys) -> None:
    assert main(["estimate", str(config_dir), "--dtype", "int8"]) == 2
    line = one_error_line(capsys.readouterr().err, "estimate")
    assert "dtype='int8' must be one of" in line and "'bfloat16'" in line
    assert main(["estimate", str(config_dir), "--optimizer", "adam"]) == 2
    assert "optimizer='adam' must be one of" in one_error_line(capsys.readouterr().err, "estimate")


def test_estimate_bad_model_is_exit_2_with_one_line(tmp_path, capsys) -> None:
    from transformers import T5Config

    assert main(["estimate", str(tmp_path / "missing")]) == 2
    line = one_error_line(capsys.readouterr().err, "estimate")
    assert f"no config.json for '{tmp_path / 'missing'}'" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["estimate", str(empty)]) == 2
    assert "no config.json for" in one_error_line(capsys.readouterr().err, "estimate")
    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50).save_pretrained(tmp_path / "t5")
    assert main(["estimate", str(tmp_path / "t5")]) == 2
    assert "encoder-decoder" in one_error_line(capsys.readouterr().err, "estimate")


def test_estimate_and_measure_are_exported() -> None:
    assert peftkit.estimate is memory.estimate
    assert peftkit.measure_training_step is memory.measure_training_step
    assert {"estimate", "measure_training_step"} <= set(peftkit.__all__)


# ------------------------------------------------------------------------------------ train --estimate-only
def test_train_estimate_only_prints_the_runs_estimate_and_writes_nothing(
    config_dir, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    run = ["train", "--model", str(config_dir), "--output-dir", str(out), "--estimate-only"]
    flags = ["--method", "lora", "--r", "4", "--target-modules", "q_proj,v_proj", "--lora-dropout", "0.1"]
    flags += ["--batch-size", "2", "--max-length", "32", "--dtype", "bfloat16", "--gradient-checkpointing"]
    assert main([*run, *flags]) == 0
    printed = capsys.readouterr().out
    lora = build_method_config(
        "lora", {"r": 4, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1}, "causal-lm"
    )
    # no tokenizer in config_dir: rows of max_length; peftkit train's fused loss and padded batches
    expected = estimate(
        str(config_dir),
        method=lora,
        batch=2,
        seq=32,
        dtype="bfloat16",
        grad_checkpointing=True,
        loss="fused",
        padded=True,
    )
    assert printed.startswith(format_estimate(expected) + "\n")
    assert "lora r=4 (q_proj, v_proj), dropout 0.1" in printed and "gradient checkpointing" in printed
    assert "this run: the LoRA column" in printed
    assert not out.exists()


def test_train_estimate_only_full_compares_with_the_default_lora(config_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = [
        "train",
        "--model",
        str(config_dir),
        "--output-dir",
        str(out),
        "--estimate-only",
        "--method",
        "full",
    ]
    assert main([*argv, "--batch-size", "2", "--max-length", "16"]) == 0
    printed = capsys.readouterr().out
    default_lora = build_method_config("lora", {}, "causal-lm")
    assert printed.startswith(
        format_estimate(
            estimate(str(config_dir), method=default_lora, batch=2, seq=16, loss="fused", padded=True)
        )
    )
    assert "lora r=8 (q_proj, k_proj, v_proj, o_proj)" in printed
    assert "this run: full fine-tuning (the LoRA column is peftkit train's default LoRA" in printed
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "ia3"], "models full fine-tuning and LoRA only: method 'ia3' is not modelled"),
        (["--method", "dora"], "models full fine-tuning and LoRA only: method 'dora' is not modelled"),
        (["--method", "lora", "--use-dora", "true"], "method 'lora' is not modelled"),
        (["--method", "prompt"], "method 'prompt' is not modelled"),
        (["--task", "seq-cls"], "task 'seq-cls' is not modelled"),
    ],
)
def test_train_estimate_only_refuses_what_it_does_not_model(
    config_dir, tmp_path, flags, message, capsys
) -> None:
    out = tmp_path / "out"
    argv = ["train", "--model", str(config_dir), "--output-dir", str(out), "--estimate-only", *flags]
    assert main(argv) == 2
    assert message in one_error_line(capsys.readouterr().err, "train")
    assert not out.exists()


def test_train_estimate_only_bad_model_is_a_usage_error(tmp_path, capsys) -> None:
    assert main(["train", "--model", str(tmp_path / "missing"), "--estimate-only"]) == 2
    assert "no config.json for" in one_error_line(capsys.readouterr().err, "train")


def test_estimate_refuses_lora_settings_it_does_not_model(config_dir) -> None:
    with pytest.raises(ValueError, match="use_dora=True: estimate models plain LoRA"):
        estimate(str(config_dir), method=peftkit.LoraConfig(use_dora=True))
    with pytest.raises(ValueError, match=r"modules_to_save=\['lm_head'\]"):
        estimate(str(config_dir), method=peftkit.LoraConfig(modules_to_save=["lm_head"]))


def test_estimate_prints_the_table_and_json(tmp_path, capsys) -> None:
    tiny_llama_config().save_pretrained(tmp_path)
    args = [str(tmp_path), "--r", "4", "--targets", "q_proj,v_proj", "--batch", "2", "--seq", "16"]
    assert main(["estimate", *args, "--device-memory", "0.001"]) == 0
    table = capsys.readouterr().out
    assert "full fine-tuning" in table and "lora r=4 (q_proj, v_proj)" in table
    assert "in 0.001 GiB" in table and "does not fit" in table
    assert main(["estimate", *args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peft"]["trainable_parameters"] == 2 * 4 * ((64 + 64) + (64 + 32))
    assert main(["estimate", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err
