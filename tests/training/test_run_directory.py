"""peftkit.training.run_directory: may a directory be used, what is recorded in it, the base-model loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from peftkit.foundation.errors import UsageError
from peftkit.training.method_choice import resolved_options
from peftkit.training.run_directory import (
    CONFIG_FILE,
    SUMMARY_FILE,
    check_output_dir,
    load_base_model,
    prepare_output_dir,
    write_summary,
)
from peftkit.training.train_config import load_config


def config_in(directory: Path, **changes):
    """Settings as a run uses them: the method's default options written out."""
    config = load_config(None, {"output_dir": str(directory), **changes})
    return config.replace(method_options=resolved_options(config.method, config.method_options))


def add_checkpoint(directory: Path, step: int = 2) -> None:
    """What latest_checkpoint counts as a complete checkpoint: a step directory with its state.json."""
    folder = directory / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": step}))


def test_a_new_or_empty_directory_may_be_used_and_a_full_one_only_with_overwrite(tmp_path) -> None:
    check_output_dir(config_in(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    check_output_dir(config_in(tmp_path / "empty"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "file").write_text("x")
    with pytest.raises(UsageError, match=r"output_dir .*full exists and is not empty; pass --overwrite"):
        check_output_dir(config_in(full))
    check_output_dir(config_in(full, overwrite=True))
    assert (full / "file").exists()  # checking writes nothing


def test_resume_needs_a_checkpoint_and_the_same_settings(tmp_path) -> None:
    config = config_in(tmp_path, resume=True)
    with pytest.raises(UsageError, match=r"--resume: no checkpoint in .*save_every > 0"):
        check_output_dir(config)
    add_checkpoint(tmp_path)
    check_output_dir(config)  # no train_config.yaml: nothing to compare with
    prepare_output_dir(config.replace(resume=False))
    check_output_dir(config.replace(max_steps=100, threads=2, eval_every=5))  # resumable changes
    with pytest.raises(UsageError, match=r"--resume: lr was 0\.002 in .* but is 0\.1 now"):
        check_output_dir(config.replace(lr=0.1))


def test_resume_accepts_a_settings_file_with_the_methods_options_unresolved(tmp_path) -> None:
    add_checkpoint(tmp_path)
    config = config_in(tmp_path, resume=True)
    recorded = {**config.to_dict(), "resume": False, "method_options": {"r": 8}}  # as older peftkit wrote
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(recorded))
    check_output_dir(config)  # {"r": 8} with the defaults filled in is what the config holds
    with pytest.raises(UsageError, match="method_options was"):
        check_output_dir(config.replace(method_options={"r": 4}))


def test_resume_reads_keys_newer_than_the_settings_file_as_their_defaults(tmp_path) -> None:
    add_checkpoint(tmp_path)
    config = config_in(tmp_path, resume=True)
    recorded = config.to_dict()
    for key in ("optimizer", "lr_scheduler", "loraplus_lr_ratio"):  # added after the file was written
        del recorded[key]
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(recorded))
    check_output_dir(config)
    with pytest.raises(UsageError, match=r"--resume: lr_scheduler was 'cosine' in .* but is 'linear' now"):
        check_output_dir(config.replace(lr_scheduler="linear"))


def test_resume_of_a_classifier_recorded_without_its_labels_takes_the_datas(tmp_path) -> None:
    """A seq-cls run recorded before ``labels`` existed: the labels its data gives now are its own."""
    add_checkpoint(tmp_path)
    config = config_in(tmp_path, resume=True, task="seq-cls", labels=["neg", "pos"])
    recorded = config.to_dict()
    del recorded["labels"]
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(recorded))
    check_output_dir(config)
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump({**recorded, "labels": ["neg", "pos"]}))
    with pytest.raises(
        UsageError, match=r"--resume: labels was \['neg', 'pos'\] in .* but is \['a', 'b'\] now"
    ):
        check_output_dir(config.replace(labels=["a", "b"]))


def test_prepare_records_the_settings_and_overwrite_empties_the_directory(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    config = config_in(out, overwrite=True, lr=3e-4, method_options={"r": 4})
    assert prepare_output_dir(config) == out
    assert not (out / "stale.txt").exists()
    assert load_config(out / CONFIG_FILE) == config  # the file reads back as the same settings
    (out / CONFIG_FILE).write_text("lr: 1.0\n")
    prepare_output_dir(config.replace(overwrite=False, resume=True))  # resuming keeps the record
    assert (out / CONFIG_FILE).read_text() == "lr: 1.0\n"


def test_write_summary_writes_json(tmp_path) -> None:
    write_summary(tmp_path, {"steps": 3, "after": {"loss": 0.5}})
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == {"steps": 3, "after": {"loss": 0.5}}


def test_load_base_model_loads_the_configs_model_or_says_why_not(tmp_path, model_dir) -> None:
    model, tokenizer = load_base_model(config_in(tmp_path, model=str(model_dir)))
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.eos_token is not None
    with pytest.raises(UsageError, match=r"cannot load model .*missing.: model directory not found"):
        load_base_model(config_in(tmp_path, model=str(tmp_path / "missing")))
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for path in model_dir.iterdir():
        if "token" not in path.name:
            (no_tokenizer / path.name).write_bytes(path.read_bytes())
    with pytest.raises(UsageError, match="has no tokenizer files"):
        load_base_model(config_in(tmp_path, model=str(no_tokenizer)))
