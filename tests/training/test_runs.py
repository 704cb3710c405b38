"""peftkit.training.runs: what a directory records (or not), and prompts built as the run built them.

References: the tokenizer's own chat template applied by hand (transformers), and the documented
plain layout (turns joined by blank lines) for a tokenizer without one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import peftkit
from peftkit.foundation.errors import UsageError
from peftkit.foundation.loading import load_model
from peftkit.training.data import prepare_data
from peftkit.training.runs import NO_DATA, build_prompt, is_recorded, run_config
from peftkit.training.tasks import BUILTIN_TASKS
from peftkit.training.train_config import load_config

from helpers.tiny_lm import build_tokenizer

TEMPLATE = BUILTIN_TASKS["person-json"].settings["prompt_template"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """A LoRA adapter on the tiny Llama, saved alone: no train_config.yaml next to it."""
    directory = tmp_path_factory.mktemp("adapter")
    base, _ = load_model(str(model_dir))
    peftkit.wrap(base, peftkit.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(directory)
    return directory


def test_a_directory_without_train_config_records_no_prompt_settings_and_no_data(
    adapter_dir: Path, model_dir: Path
) -> None:
    assert not is_recorded(adapter_dir)
    config = run_config(adapter_dir)
    assert config.model == str(model_dir) and config.task == "causal-lm"  # from adapter_config.json
    # not the default job's person-json instruction and rows
    assert config.prompt_template is None and config.system_prompt is None and config.data == NO_DATA
    with pytest.raises(UsageError, match="no data given"):
        prepare_data(config, build_tokenizer())


def test_a_recorded_run_keeps_its_prompt_settings(tmp_path: Path, adapter_dir: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for file in adapter_dir.iterdir():
        (run / file.name).write_bytes(file.read_bytes())
    recorded = load_config(None, {"data": "person-json", "system_prompt": "Be brief."}).to_dict()
    (run / "train_config.yaml").write_text(yaml.safe_dump(recorded))
    config = run_config(run)
    assert is_recorded(run)
    assert (config.prompt_template, config.system_prompt, config.data) == (
        TEMPLATE,
        "Be brief.",
        "person-json",
    )


def test_build_prompt_renders_template_and_system_prompt_in_the_chat_template() -> None:
    tokenizer = build_tokenizer()
    config = load_config(None, {"data": "x.jsonl", "prompt_template": "Q: {q}", "system_prompt": "Be brief."})
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: Ada Park"}],
        add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]
    assert build_prompt(config, "Ada Park", tokenizer) == list(expected)
    raw = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ada Park"}],
        add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]
    assert build_prompt(config, "Ada Park", tokenizer, raw=True) == list(raw)


def test_build_prompt_without_a_chat_template_joins_turns_by_blank_lines() -> None:
    tokenizer = build_tokenizer(plain=True)
    config = load_config(None, {"data": "x.jsonl", "prompt_template": "Q: {q}", "system_prompt": "Be brief."})
    expected = tokenizer("Be brief.\n\nQ: Ada Park\n\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(build_prompt(config, "Ada Park", tokenizer)) == tokenizer.decode(expected)
    seq2seq = config.replace(task="seq2seq-lm")
    assert build_prompt(seq2seq, "Ada Park", tokenizer) == tokenizer("Q: Ada Park")["input_ids"]
