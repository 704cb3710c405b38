"""peftkit compare end to end on a tiny model: the report's structure, its numbers against independent
counts, reruns that skip finished methods, the dry run, and a method that cannot apply.

The tiny 2-layer Llama and tokenizer of tests/helpers/tiny_lm.py make each method's few steps take a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import peftkit
import peftkit.training.loop
from peftkit.cli import main
from peftkit.compare.plan import load_plan
from peftkit.compare.report import CHARTS, REPORT_JSON, REPORT_MD
from peftkit.compare.runner import BASE_FILE, run_compare
from peftkit.foundation.errors import UsageError
from peftkit.foundation.loading import load_model
from peftkit.training.method_choice import build_method_config
from peftkit.training.result import TrainResult
from peftkit.training.tasks import BUILTIN_TASKS

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def compare_file(tmp_path: Path, model_dir: Path, **changes) -> Path:
    task = BUILTIN_TASKS["person-json"]
    settings = {
        "model": str(model_dir),
        "data": str(task.train),
        "validation_data": str(task.validation),
        "validation_rows": 6,
        "max_steps": 3,
        "batch_size": 4,
        "warmup_steps": 1,
        "eval_examples": 3,
        "max_new_tokens": 4,
        "threads": 1,
        "output_dir": str(tmp_path / "report"),
        "methods": ["full", "lora", "prompt"],
        "ranks": [2, 4],
        **changes,
    }
    path = tmp_path / "compare.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("compare")
    path = compare_file(folder, model_dir)
    plan = load_plan(path)
    report = run_compare(plan, say=lambda text: None)
    return path, report


def test_report_has_every_method_table_row_and_chart(finished) -> None:
    path, report = finished
    out = path.parent / "report"
    names = [row["name"] for row in report["methods"]]
    assert names == ["full", "lora", "prompt", "lora-r2", "lora-r4"]
    assert report["rank_sweep"] == ["lora-r2", "lora-r4"] and report["pending"] == []
    assert json.loads((out / REPORT_JSON).read_text())["methods"] == json.loads(json.dumps(report["methods"]))
    markdown = (out / REPORT_MD).read_text()
    for name in names:
        assert f"| {name} |" in markdown
    assert "| base (no training) |" in markdown and "## Rank sweep" in markdown
    for chart in CHARTS:
        assert (out / chart).read_bytes().startswith(PNG)
    for name in names:
        assert (out / "runs" / name / "compare.json").is_file()


def test_trainable_counts_match_the_methods_applied_independently(finished, model_dir) -> None:
    _, report = finished
    rows = {row["name"]: row for row in report["methods"]}
    for name, row in rows.items():
        model, _ = load_model(str(model_dir))
        base_total = sum(p.numel() for p in model.parameters())
        method = build_method_config(row["method"], row["method_options"], "causal-lm")
        counts = (
            (base_total, base_total) if method is None else peftkit.wrap(model, method).trainable_parameters()
        )
        assert (row["trainable_parameters"], row["total_parameters"]) == counts, name
        assert row["trainable_percent"] == pytest.approx(100 * counts[0] / counts[1], rel=1e-12)
        assert report["base"]["total_parameters"] == base_total
    assert rows["lora-r4"]["trainable_parameters"] == 2 * rows["lora-r2"]["trainable_parameters"]


def test_sizes_memory_and_forgetting_are_consistent(finished, model_dir) -> None:
    path, report = finished
    out = path.parent / "report"
    base = report["base"]
    for row in report["methods"]:
        files = list((out / "runs" / row["name"]).glob("*.safetensors"))
        assert row["saved_bytes"] == sum(f.stat().st_size for f in files) > 0
        measured = row["measured_memory"]
        # fp32 AdamW: one gradient and two states per trainable parameter, one 4-byte step per tensor
        assert measured["gradients"] == 4 * row["trainable_parameters"]
        assert 0 <= measured["optimizer_states"] - 8 * row["trainable_parameters"] <= 4 * 256
        assert measured["peak"] >= measured["weights"] + measured["optimizer_states"]
        assert row["forgetting"] == pytest.approx(row["general_loss"] - base["general_loss"], abs=1e-12)
        assert row["seconds_per_step"] > 0 and row["steps"] == 3
    rows = {row["name"]: row for row in report["methods"]}
    # the full checkpoint is the whole model; an adapter a small part of it
    assert rows["full"]["saved_bytes"] == pytest.approx(base["checkpoint_bytes"], rel=0.05)
    assert rows["lora"]["saved_bytes"] < 0.2 * base["checkpoint_bytes"]
    assert rows["full"]["estimated_peak_bytes"] and rows["lora"]["estimated_peak_bytes"]
    assert rows["prompt"]["estimated_peak_bytes"] is None  # the estimate models full and LoRA only


def test_general_loss_equals_plain_cross_entropy(finished, model_dir) -> None:
    _, report = finished
    model, tokenizer = load_model(str(model_dir))
    ids = tokenizer(Path(report["general_text"]).read_text(), add_special_tokens=False)["input_ids"]
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), 256):
            row = torch.tensor([ids[start : start + 256]])
            if row.shape[1] < 2:
                continue
            logits = model(input_ids=row).logits
            total += F.cross_entropy(logits[0, :-1], row[0, 1:], reduction="sum").item()
            count += row.shape[1] - 1
    assert report["base"]["general_loss"] == pytest.approx(total / count, rel=1e-5)


def test_rerun_skips_finished_methods_and_retrains_changed_ones(finished, monkeypatch) -> None:
    path, report = finished
    trained: list[str] = []
    real_train = peftkit.training.loop.train

    def counting_train(config, *args, **kwargs):
        trained.append(Path(config.output_dir).name)
        return real_train(config, *args, **kwargs)

    monkeypatch.setattr(peftkit.training.loop, "train", counting_train)
    again = run_compare(load_plan(path), say=lambda text: None)
    assert trained == []
    assert [r["measured_memory"] for r in again["methods"]] == [
        r["measured_memory"] for r in report["methods"]
    ]
    changed = json.loads(path.read_text())
    changed["methods"] = ["full", "lora", {"name": "prompt", "preset": "prompt", "lr": 0.1}]
    path.write_text(json.dumps(changed))
    run_compare(load_plan(path), say=lambda text: None)
    assert trained == ["prompt"]


def test_an_interrupted_method_is_not_recorded_and_stops_the_comparison(
    tmp_path, model_dir, monkeypatch
) -> None:
    def interrupted_train(config, *args, **kwargs):
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        return TrainResult(Path(config.output_dir), 1, 0, [1.0], "exact_match", stopped="interrupted")

    monkeypatch.setattr(peftkit.training.loop, "train", interrupted_train)
    path = compare_file(tmp_path, model_dir, methods=["lora", "prompt"], ranks=None)
    with pytest.raises(KeyboardInterrupt):
        run_compare(load_plan(path), say=lambda text: None)
    assert not (tmp_path / "report" / "runs" / "lora" / "compare.json").exists()
    report = json.loads((tmp_path / "report" / REPORT_JSON).read_text())
    assert report["methods"] == [] and report["pending"] == ["lora", "prompt"]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, model_dir, capsys) -> None:
    path = compare_file(tmp_path, model_dir)
    assert main(["compare", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in ("full", "lora", "prompt", "lora-r2", "lora-r4"):
        assert any(line.split()[:1] == [name] for line in lines), name
    assert "est. time" in out and "5 runs" in out
    assert not (tmp_path / "report").exists()


def test_a_method_that_cannot_apply_fails_before_anything_runs(tmp_path, model_dir, capsys) -> None:
    path = compare_file(tmp_path, model_dir, methods=["lora", "bitfit"], ranks=None)
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bitfit" in err and "bias" in err
    assert not (tmp_path / "report").exists()
    with pytest.raises(UsageError):
        from peftkit.compare.dry_run import check_plan

        check_plan(load_plan(path))


def test_base_scores_are_computed_once(finished) -> None:
    path, report = finished
    base = json.loads((path.parent / "report" / BASE_FILE).read_text())
    assert base["scores"] == report["base"]["scores"]
    assert base["metric"] == "exact_match" and "loss" in base["scores"]


def test_objectives_compare_on_pairs(tmp_path: Path, model_dir: Path) -> None:
    """Methods with their own objectives on the bundled pairs: the base scored under the shared
    objective (DPO: it is its own reference, so 0.5 and margin 0), each row its objective's scores and
    a measured step of that objective."""
    task = BUILTIN_TASKS["person-json-pairs"]
    path = compare_file(
        tmp_path,
        model_dir,
        objective="dpo",
        data=str(task.train),
        validation_data=str(task.validation),
        ranks=None,
        methods=[
            {"name": "lora-dpo", "preset": "lora"},
            {"name": "lora-orpo", "preset": "lora", "objective": "orpo", "beta": 0.2},
            {"name": "lora-simpo", "preset": "lora", "objective": "simpo"},
        ],
    )
    report = run_compare(load_plan(path), say=lambda text: None)
    base = report["base"]
    assert report["metric"] == "preference_accuracy" and base["objective"] == "dpo"
    assert base["scores"]["preference_accuracy"] == 0.5 and base["scores"]["reward_margin"] == 0.0
    rows = {row["name"]: row for row in report["methods"]}
    assert [rows[name]["objective"] for name in ("lora-dpo", "lora-orpo", "lora-simpo")] == [
        "dpo",
        "orpo",
        "simpo",
    ]
    for row in rows.values():
        assert {"preference_accuracy", "reward_margin", "loss"} <= row["scores"].keys()
        assert row["measured_memory"]["peak"] > 0 and row["estimated_peak_bytes"] > 0
    text = (tmp_path / "report" / REPORT_MD).read_text()
    assert "objective orpo beta=0.2" in text and "preference_accuracy (base → after)" in text


def test_a_comparison_trains_one_kind_of_objective(tmp_path: Path, model_dir: Path) -> None:
    path = compare_file(
        tmp_path,
        model_dir,
        ranks=None,
        methods=["lora", {"name": "dpo", "preset": "lora", "objective": "dpo"}],
    )
    with pytest.raises(UsageError, match=r"mix objectives sft .* and dpo"):
        load_plan(path)
