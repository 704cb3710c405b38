"""``peftkit export``: what it writes and prints, and bad input as one line on stderr with exit code 2 and
nothing written (no OUT, no temporary file beside it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.cli import main
from peftkit.foundation.errors import UsageError

from helpers.llama_cpp_run import require_llama_cpp
from helpers.tiny_families import FAMILIES, save_family, save_random_lora


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-cli")
    llama = save_family(FAMILIES[0], root / "llama")
    return {"llama": llama, "adapter": save_random_lora(llama, root / "adapter")}


def _fails(argv: list[str], capsys, out: Path, *phrases: str) -> None:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors (an unknown choice)
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for phrase in phrases:
        assert phrase in err, err
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_exports_a_run_and_says_how_to_run_it(dirs, tmp_path, capsys) -> None:
    out = tmp_path / "model.gguf"
    assert main(["export", str(dirs["adapter"]), str(out), "--outtype", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_size > 0 and f"llama-cli -m {out}" in printed and "(Llama, q8_0)" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_ollama_writes_a_directory_with_the_gguf_and_a_modelfile(dirs, tmp_path, capsys) -> None:
    out = tmp_path / "ollama"
    assert main(["export", str(dirs["adapter"]), str(out), "--format", "ollama"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "ollama create NAME -f" in capsys.readouterr().out


def test_ollama_carries_the_runs_system_prompt_and_prompt_template(dirs, tmp_path) -> None:
    import yaml

    from peftkit.training.train_config import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    for file in dirs["adapter"].iterdir():
        (run / file.name).write_bytes(file.read_bytes())
    settings = TrainConfig(
        model=str(dirs["llama"]),
        output_dir=str(run),
        data="person-json",
        system_prompt="Answer with JSON only.",
        prompt_template="Extract the person: {text}",
    )
    (run / "train_config.yaml").write_text(yaml.safe_dump(settings.to_dict(), sort_keys=False))
    assert main(["export", str(run), str(tmp_path / "ollama"), "--format", "ollama"]) == 0
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert 'SYSTEM """Answer with JSON only."""' in modelfile
    assert "<|im_start|>user\nExtract the person: {{ .Content }}<|im_end|>" in modelfile


def test_verify_prints_llama_cpps_comparison(dirs, tmp_path, capsys) -> None:
    require_llama_cpp()
    out = tmp_path / "adapter.gguf"
    argv = ["export", str(dirs["adapter"]), str(out), "--format", "gguf-lora", "--outtype", "f32", "--verify"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "llama.cpp against peftkit" in printed and "20/20" in printed and "DIFFER" not in printed


def test_an_existing_out_needs_overwrite(dirs, tmp_path, capsys) -> None:
    out = tmp_path / "model.gguf"
    out.write_text("keep me")
    assert main(["export", str(dirs["llama"]), str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main(["export", str(dirs["llama"]), str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize(
    ("flags", "phrase"),
    [(["--format", "onnx"], "invalid choice: 'onnx'"), (["--outtype", "q4_k"], "invalid choice: 'q4_k'")],
)
def test_unknown_format_or_outtype(flags, phrase, dirs, tmp_path, capsys) -> None:
    _fails(
        ["export", str(dirs["llama"]), str(tmp_path / "m.gguf"), *flags], capsys, tmp_path / "m.gguf", phrase
    )


def test_an_adapter_without_a_recorded_base_needs_model(dirs, tmp_path, capsys) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for file in dirs["adapter"].iterdir():
        (adapter / file.name).write_bytes(file.read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    _fails(["export", str(adapter), str(out)], capsys, out, "records no base model", "--model")
    _fails(
        ["export", str(adapter), str(out), "--model", str(tmp_path / "nowhere")],
        capsys,
        out,
        "cannot load the base",
    )


def test_an_adapter_for_other_shapes_is_refused(dirs, tmp_path, capsys) -> None:
    from helpers.tiny_lm import save_tiny_lm

    narrower = save_tiny_lm(tmp_path / "hidden-32")  # a Llama of width 32; the adapter is for 64
    out = tmp_path / "m.gguf"
    _fails(
        ["export", str(dirs["adapter"]), str(out), "--model", str(narrower)],
        capsys,
        out,
        "cannot load the adapter",
    )


def test_an_unsupported_architecture_is_refused(tmp_path, capsys) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from helpers.tiny_lm import build_tokenizer

    tokenizer = build_tokenizer()
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer))).save_pretrained(
        tmp_path / "gpt2"
    )
    tokenizer.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "m.gguf"
    _fails(["export", str(tmp_path / "gpt2"), str(out)], capsys, out, "GPT2LMHeadModel", "supported: Llama")


def test_a_missing_source_is_refused(tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "m.gguf"
    _fails(["export", str(tmp_path / "no-run"), str(out)], capsys, out, "not a directory")
    monkeypatch.chdir(
        tmp_path
    )  # "out/train" before `make train`: read as a Hub id, which does not load offline
    _fails(
        ["export", "out/train", "m.gguf"],
        capsys,
        out,
        "SOURCE out/train is no run, adapter or model directory",
    )


def test_the_python_api_is_the_commands(dirs, tmp_path) -> None:
    from peftkit.export import gguf_export

    result = gguf_export.export(dirs["adapter"], tmp_path / "a.gguf", format="gguf-lora")
    assert result.files == [tmp_path / "a.gguf"] and result.architecture == "Llama"
    with pytest.raises(UsageError, match="unknown format"):
        gguf_export.export(dirs["adapter"], tmp_path / "b.gguf", format="onnx")
