"""What a finished run reports agrees with itself: the parameter counts of its trainable table, its
summary and ``print_trainable_parameters`` on a 4-bit base; the base's precision in its header; wall
and training time across a ``--resume``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from peftkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["--max-steps", "2", "--batch-size", "2", "--eval-examples", "0", "--validation-rows", "4"]


@pytest.fixture(scope="module")
def model_128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with hidden size 128 (bitsandbytes quantizes blocks of 64 values)."""
    from helpers.tiny_lm import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny-128"), hidden=128)


def _count(text: str, row: str) -> int:
    """The number in the trainable table's row ``row`` (e.g. "total parameters")."""
    return int(re.search(rf"^{row}\s+([\d,]+)$", text, re.MULTILINE).group(1).replace(",", ""))


def test_a_4bit_run_counts_the_weights_it_stands_for_everywhere(
    model_128: Path, tmp_path: Path, capsys
) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    # the reference: the same checkpoint in float32, where each parameter element is one weight
    floats = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_128).parameters())
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_128), "--quantize", "nf4", "--output-dir", str(out), *RUN]
    assert main(argv) == 0
    text = capsys.readouterr().out
    trainable = _count(text, "total trainable")
    total = floats + trainable  # the base's weights and the adapter's
    assert _count(text, "total parameters") == total  # the table counted packed bytes (half of 4-bit)
    assert f"trainable: {trainable:,} ({trainable / 1000:.2f}K) of {total:,}" in text
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["trainable"], summary["total"]) == (trainable, total)
    assert re.search(rf"^trainable params\s+{trainable:,} of ", text, re.MULTILINE)
    from peftkit.training.runs import load_run

    model, _, _ = load_run(out)  # the adapter loaded frozen: only the total is comparable
    model.print_trainable_parameters()
    assert f"trainable: 0 (0) of {total:,} " in capsys.readouterr().out


def test_a_4bit_run_names_its_base_precision(model_128: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("bitsandbytes")
    argv = ["train", "--model", str(model_128), "--quantize", "nf4", "--output-dir", str(tmp_path / "r")]
    assert main([*argv, *RUN, "--quantize-options", "{compute_dtype: float32}"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.endswith("(causal-lm, nf4 linear layers computing in float32, the rest float32)")
    assert main(["train", "--model", str(model_128), "--output-dir", str(tmp_path / "f"), *RUN]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("(causal-lm, float32)")


def test_a_resumed_run_counts_wall_and_training_time_over_all_its_sessions(
    model_128: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_128), "--output-dir", str(out), "--save-every", "2", *RUN]
    assert main(argv) == 0
    state_file = out / "checkpoints" / "step-000002" / "state.json"
    state = json.loads(state_file.read_text())
    # as if the first session had been long: 100 s of steps in 120 s
    state_file.write_text(json.dumps({**state, "train_time": 100.0, "wall_time": 120.0}))
    capsys.readouterr()
    assert main([*argv, "--resume", "--max-steps", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 100.0 < summary["train_time_s"] < summary["wall_time_s"]
    assert 120.0 < summary["wall_time_s"] < 120.0 + 600  # this session's wall time added to the first's
    assert summary["sessions"] == 2
    assert 0 < state["train_time"] <= state["wall_time"]  # the first session's own, up to its checkpoint
    text = capsys.readouterr().out
    assert re.search(
        r"^wall time\s+2m\d+s \(training 1m4\ds; both since step 0, over 2 sessions\)$", text, re.M
    )
