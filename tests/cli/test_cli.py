"""The ``peftkit`` command: --help everywhere, config keys as flags, bad input (exit 2, one stderr line,
output untouched), and train → generate / eval / merge / inspect on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import peftkit
from peftkit.cli import EXIT_INTERRUPTED, build_parser, main, parse_train_args
from peftkit.foundation.errors import UsageError
from peftkit.training.loop import train
from peftkit.training.method_choice import build_method_config
from peftkit.training.tasks import BUILTIN_TASKS
from peftkit.training.train_config import FIELDS, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = BUILTIN_TASKS["person-json"].settings["prompt_template"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(BUILTIN_TASKS["person-json"].train.read_text().splitlines()[:24]) + "\n")
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, data_file: Path):
    """A tiny LoRA run on the person-json format (10 steps)."""
    out = tmp_path_factory.mktemp("run") / "run"
    config = load_config(
        None,
        {
            "model": str(model_dir),
            "data": str(data_file),
            "validation_split": 0.25,
            "prompt_template": TEMPLATE,
            "output_dir": str(out),
            "max_steps": 10,
            "batch_size": 4,
            "lr": 1e-2,
            "eval_examples": 2,
            "max_new_tokens": 4,
            "threads": 1,
        },
    )
    return train(config)


def parse(argv: list[str]) -> TrainConfig:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parse_train_args(subparsers.choices["train"], argv)[1]


# ------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize(
    "command",
    [[], ["train"], ["eval"], ["generate"], ["merge"], ["combine"], ["inspect"], ["estimate"], ["compare"]],
)
def test_help_everywhere(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: peftkit {' '.join(command)}".rstrip())
    if command == ["train"]:
        assert "--max-steps" in out and "--lr" in out and "--method" in out


def test_console_entry_point_runs() -> None:
    script = Path(sys.executable).parent / "peftkit"  # installed next to this Python by pip install
    if not script.is_file():
        pytest.skip(f"no {script}: peftkit is not pip-installed in this environment")
    done = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--max-steps" in done.stdout


# ------------------------------------------------------------------------------------------ config and flags
def _other_value(name: str, field: dataclasses.Field):
    kind, default = str(field.type), getattr(TrainConfig(), name)
    if "choices" in field.metadata:
        return next(c for c in field.metadata["choices"] if c != default)
    if kind.startswith("bool"):
        return not default
    if kind.startswith("int"):
        return default + 1
    if kind.startswith("float"):
        return {"validation_split": 0.3, "lr": 1e-4}.get(name, default + 0.5)
    if kind.startswith("list"):
        return ["a", "b"]
    if kind.startswith("dict"):
        return {"double_quant": False} if name == "quantize_options" else {"r": 4}
    return f"{name}-value"


@pytest.mark.parametrize("name", [n for n in FIELDS if n not in ("resume",)])
def test_every_config_key_is_a_flag(name: str) -> None:
    value = _other_value(name, FIELDS[name])
    if isinstance(value, bool):
        argv = [f"--{name.replace('_', '-')}" if value else f"--no-{name.replace('_', '-')}"]
    else:
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        argv = [f"--{name.replace('_', '-')}", text]
    if name == "quantize_options":
        argv += ["--quantize", "nf4"]  # they apply to a quantized base only
    if name == "loraplus_lr_ratio":
        argv += ["--optimizer", "lora-plus"]  # the ratio applies to LoRA+ only
    if name == "labels":
        argv += ["--task", "seq-cls"]  # labels name a classifier's classes
    assert getattr(parse(argv), name) == value


def test_underscore_flags_and_method_options_as_flags() -> None:
    config = parse(
        ["--max_steps", "7", "--r", "16", "--lora-alpha", "32", "--target-modules", "q_proj,v_proj"]
    )
    assert config.max_steps == 7
    assert config.method_options == {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
    lora = build_method_config(config.method, config.method_options, config.task)
    assert (lora.r, lora.lora_alpha, lora.target_modules) == (16, 32, ("q_proj", "v_proj"))


def test_flags_override_the_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("lr: 1.0e-4\nmax_steps: 5\nmethod_options:\n  r: 4\n")
    config = parse([str(path), "--lr", "3e-4", "--lora-alpha", "8"])
    assert (config.lr, config.max_steps) == (3e-4, 5)
    assert config.method_options == {"r": 4, "lora_alpha": 8}


def test_documented_example_is_the_default_job() -> None:
    example = load_config(REPO / "examples" / "train.yaml")
    default = load_config(None)
    assert dataclasses.replace(example, method_options={}) == default
    assert build_method_config("lora", example.method_options, "causal-lm") == build_method_config(
        "lora", {}, "causal-lm"
    )
    assert set(yaml.safe_load((REPO / "examples" / "train.yaml").read_text())) == set(FIELDS)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_step: 5\n", "unknown setting 'max_step' in .*did you mean 'max_steps'"),
        ("learning_rate: 1\n", "unknown setting 'learning_rate' in .*did you mean 'lr'"),
        ("lora_r: 8\n", "unknown setting 'lora_r' in .*option of method 'lora' .*did you mean 'r'"),
        ("method: ia3\nr: 8\n", "unknown setting 'r' in .*option of method 'ia3'"),
        ("lr: -1\n", r"lr=-1.0 .* must be a positive number"),
        ("batch_size: 2.5\n", "batch_size=2.5 .* must be int"),
        ("task: causal\n", "task='causal' .* must be one of .*did you mean 'causal-lm'"),
        ("labels: [neg, pos]\n", r"labels .* name a classifier's classes: add --task seq-cls"),
        ("task: seq-cls\nlabels: [neg, pos, neg]\n", r"labels .* names 'neg' twice; give two or more"),
        ("- a list\n", "must hold a mapping"),
        ("lr: [1\n", "is not valid YAML"),
    ],
)
def test_bad_yaml_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_config(path)


def test_labels_written_as_numbers_are_class_names(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("task: seq-cls\nlabels: [0, 1]\n")  # YAML reads numbers; the data's labels are text
    assert load_config(path).labels == ["0", "1"]


def test_misspelt_flags_suggest_the_closest() -> None:
    with pytest.raises(UsageError, match=r"unknown setting '--max-step': .*did you mean '--max-steps'"):
        parse(["--max-step", "3"])
    with pytest.raises(UsageError, match="did you mean '--lora-alpha'"):
        parse(["--lora-alfa", "32"])
    with pytest.raises(UsageError, match="did you mean '--lr'"):
        parse(["--learning-rate", "0.1"])
    with pytest.raises(UsageError, match="did you mean '--r'"):
        parse(["--lora-r", "8"])


def test_misspelt_subcommand_flags_suggest_from_that_subcommand(capsys) -> None:
    assert main(["eval", "out/none", "--exmaples", "5"]) == 2
    line = capsys.readouterr().err.strip()
    expected = "unknown flag --exmaples (did you mean '--examples'?); see peftkit eval --help"
    assert line == f"peftkit eval: error: {expected}"


def test_an_option_of_another_method_says_whose_it_is() -> None:
    with pytest.raises(UsageError, match=r"--r is an option of method lora, dora\)"):
        parse(["--method", "ia3", "--r", "8"])


def test_yaml_takes_method_options_flat_as_flags_do(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("r: 16\nmethod_options: {lora_alpha: 32}\n")
    assert load_config(path).method_options == {"r": 16, "lora_alpha": 32}
    path.write_text("method_options: {rank: 8}\n")
    with pytest.raises(UsageError, match=r"unknown option 'rank' for method 'lora'.*did you mean 'r'"):
        build_method_config("lora", load_config(path).method_options, "causal-lm")


# ------------------------------------------------------------------------------------------ bad input
def _bad_cases(tmp_path: Path, model_dir: Path, data_file: Path) -> list[tuple[list[str], str]]:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    tiny = ["--model", str(model_dir)]
    return [
        ([*tiny, "--data", str(tmp_path / "missing.jsonl")], "data file not found"),
        ([*tiny, "--data", str(empty)], "is empty"),
        ([*tiny, "--data", str(data_file), "--completion-column", "answr"], "column 'answr' not found"),
        (["--model", str(tmp_path / "no" / "such" / "model")], "cannot load model"),
        (["--method", "lorra"], "unknown method 'lorra'.*did you mean 'lora'"),
        (["--r", "0"], "r=0 must be a positive integer"),
        (["--lr", "-1"], r"lr=-1.0 .*must be a positive number"),
        (["--method", "full", "--r", "8"], "unknown setting '--r'"),
    ]


def test_bad_input_one_stderr_line_exit_2_and_output_untouched(
    tmp_path, model_dir, data_file, capsys
) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    for argv, message in _bad_cases(tmp_path, model_dir, data_file):
        for out, extra in ((existing, ["--overwrite"]), (tmp_path / "fresh", [])):
            code = main(["train", *argv, "--output-dir", str(out), *extra])
            captured = capsys.readouterr()
            lines = captured.err.strip().splitlines()
            assert code == 2, (argv, captured.err)
            assert len(lines) == 1 and lines[0].startswith("peftkit train: error: "), captured.err
            assert re.search(message, lines[0]), (message, lines[0])
            assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
            assert not (tmp_path / "fresh").exists()


def test_existing_output_dir_needs_overwrite(tmp_path, model_dir, data_file, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    base = ["train", "--model", str(model_dir), "--data", str(data_file), "--output-dir", str(out)]
    base += ["--max-steps", "1", "--batch-size", "4", "--eval-examples", "0", "--validation-split", "0.25"]
    assert main(base) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main([*base, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()


def test_overwrite_refuses_the_working_directory(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["train", "--output-dir", ".", "--overwrite"]) == 2
    assert "--overwrite would delete" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, model_dir, data_file) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "peftkit", "train", "--model", str(model_dir), "--data", str(data_file)]
    command += [
        "--output-dir",
        str(out),
        "--max-steps",
        "100000",
        "--batch-size",
        "4",
        "--eval-examples",
        "0",
    ]
    command += ["--validation-split", "0.25"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and '"split": "train"' in metrics.read_text():
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == EXIT_INTERRUPTED, stderr[-2000:]
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and "interrupted at step" in stdout and "--resume" in stdout
    step = json.loads((checkpoints[0] / "state.json").read_text())["step"]
    assert checkpoints[0].name == f"step-{step:06d}"


# ------------------------------------------------------------------------------------------ using a run
def test_generate_applies_the_runs_template_and_chat(trained_run, capsys) -> None:
    sentence = "Meet Lena Berg, 41, a pilot based in Oslo."
    assert main(["generate", str(trained_run.output_dir), sentence, "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    # reference: transformers' generate on the trained model, the prompt built by hand
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(load_config(trained_run.output_dir / "train_config.yaml").model)
    messages = [{"role": "user", "content": TEMPLATE.format(prompt=sentence)}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = trained_run.model.generate(**ids, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert printed == expected


SENTENCE = "Meet Lena Berg, 41, a pilot based in Oslo."


@pytest.fixture
def fed_prompts(monkeypatch) -> list[list[int]]:
    """The token ids peftkit generate gives the model (generation itself is skipped)."""
    fed: list[list[int]] = []

    def record(model, tokenizer, prompts, task, max_new_tokens, **kwargs):
        fed.extend(list(p) for p in prompts)
        return ["-"] * len(prompts)

    monkeypatch.setattr("peftkit.training.evaluation.generate_answers", record)
    return fed


def chat_prompt(model_dir: Path, text: str) -> list[int]:
    """The model's chat template over one user turn, applied with transformers alone."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": text}]
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    )


def test_build_prompt_is_what_generate_feeds_the_model(trained_run, fed_prompts) -> None:
    from peftkit.training.runs import build_prompt, run_config

    assert main(["generate", str(trained_run.output_dir), SENTENCE]) == 0
    config = run_config(trained_run.output_dir)
    assert fed_prompts == [build_prompt(config, SENTENCE, trained_run.tokenizer)]
    assert fed_prompts == [chat_prompt(Path(config.model), TEMPLATE.format(prompt=SENTENCE))]


def test_readme_snippet_prompts_a_run_as_peftkit_generate_does(trained_run, capsys) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Prompting a trained run from Python", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    run = str(trained_run.output_dir)
    sentence = BUILTIN_TASKS["person-json"].example
    assert '"out/train"' in snippet and json.dumps(sentence) in snippet
    exec(compile(snippet.replace('"out/train"', repr(run)), "README.md", "exec"), {})
    from_python = capsys.readouterr().out.strip()
    assert main(["generate", run, sentence]) == 0
    assert capsys.readouterr().out.strip() == from_python


def test_a_directory_without_train_config_gets_no_recorded_settings(
    trained_run, data_file, tmp_path, fed_prompts, capsys
) -> None:
    adapter = tmp_path / "adapter"  # the adapter copied elsewhere, without train_config.yaml
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_bytes((trained_run.output_dir / name).read_bytes())
    assert main(["generate", str(adapter), SENTENCE]) == 0
    err = capsys.readouterr().err
    assert f"no train_config.yaml in {adapter}" in err and "chat template and your text as is" in err
    model_dir = Path(load_config(trained_run.output_dir / "train_config.yaml").model)
    assert fed_prompts == [chat_prompt(model_dir, SENTENCE)]  # no person-json instruction

    assert main(["eval", str(adapter)]) == 2  # no recorded held-out rows: they are not guessed
    err = capsys.readouterr().err.strip()
    assert "pass --data FILE" in err and len(err.splitlines()) == 1
    assert main(["eval", str(adapter), "--data", str(data_file), "--examples", "0"]) == 0
    out, err = capsys.readouterr()
    assert f"on 24 held-out rows of {data_file}" in out and f"no train_config.yaml in {adapter}" in err


def test_eval_reports_the_runs_held_out_loss(trained_run, capsys) -> None:
    assert main(["eval", str(trained_run.output_dir), "--examples", "2", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    held_out = len(trained_run.data.validation)  # 6: a quarter of 24 rows
    assert f"on {held_out} held-out rows of " in out
    assert f"all {held_out} rows scored by loss/perplexity, the first 2 also by generation" in out
    assert "eval: loss" in err and "eval: generating" in err and f"{held_out + 2}/{held_out + 2}" in err
    loss = float(next(line.split()[1] for line in out.splitlines() if line.strip().startswith("loss ")))
    assert loss == pytest.approx(trained_run.after["loss"], abs=1e-4)
    assert main(["eval", str(trained_run.output_dir), "--base", "--examples", "0"]) == 0
    base_loss = float(
        next(line.split()[1] for line in capsys.readouterr().out.splitlines() if "loss " in line)
    )
    assert base_loss == pytest.approx(trained_run.before["loss"], abs=1e-4)


def test_merge_writes_a_model_transformers_loads_alone(trained_run, tmp_path, capsys, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", str(trained_run.output_dir), str(out)]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, trained_run.model(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    assert not any(isinstance(m, peftkit.core.layer.AdapterLayer) for m in merged.modules())
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
    assert main(["merge", str(trained_run.output_dir), str(out)]) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    monkeypatch.chdir(out)  # the working directory is never deleted, --overwrite or not
    assert main(["merge", str(trained_run.output_dir), ".", "--overwrite"]) == 2
    assert "--overwrite would delete" in capsys.readouterr().err and (out / "config.json").is_file()


def test_a_merged_model_prompts_and_scores_as_its_run(trained_run, tmp_path, capsys) -> None:
    run, out = str(trained_run.output_dir), tmp_path / "merged"
    assert main(["merge", run, str(out)]) == 0
    recorded = yaml.safe_load((out / "train_config.yaml").read_text())
    assert recorded == yaml.safe_load((trained_run.output_dir / "train_config.yaml").read_text())
    capsys.readouterr()
    assert main(["generate", str(out), SENTENCE, "--max-new-tokens", "6"]) == 0
    merged_answer, err = capsys.readouterr()
    assert "no train_config.yaml" not in err
    assert main(["generate", run, SENTENCE, "--max-new-tokens", "6"]) == 0
    assert merged_answer == capsys.readouterr().out  # the merged weights with the run's prompt
    assert main(["eval", str(out), "--examples", "0"]) == 0
    loss = float(next(line.split()[1] for line in capsys.readouterr().out.splitlines() if "loss " in line))
    assert loss == pytest.approx(trained_run.after["loss"], abs=1e-4)  # the run's held-out rows


def test_inspect_lists_modules_targets_and_trainable_table(model_dir, capsys) -> None:
    assert main(["inspect", "--model", str(model_dir), "--filter", r"layers\.0\.self_attn"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"model\.layers\.0\.self_attn\.q_proj\s+Linear\s+32x32\s+1,024", out)
    assert "model.layers.1." not in out.split("LoraConfig")[0]  # the filter applies to the module list
    assert "LoraConfig adapts 8 modules" in out
    assert "trainable: 3,584" in out
    assert main(["inspect", "--model", str(model_dir), "--method", "full", "--no-modules"]) == 0
    assert "every parameter trains" in capsys.readouterr().out
