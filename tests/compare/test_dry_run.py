"""compare --dry-run's time model: measured at the runs' own thread count, decoding as many tokens as
evaluation will; and scoring the base model shows progress. On the tiny Llama of tests/helpers/tiny_lm.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from peftkit.compare import dry_run, runner
from peftkit.compare.plan import load_plan
from peftkit.foundation.loading import load_tokenizer
from peftkit.training.evaluation import ANSWER_MARGIN
from peftkit.training.tasks import BUILTIN_TASKS


def _plan(tmp_path: Path, model_dir: Path, **changes):
    task = BUILTIN_TASKS["person-json"]
    settings = {
        "model": str(model_dir),
        "data": str(task.train),
        "validation_data": str(task.validation),
        "validation_rows": 6,
        "eval_examples": 3,
        "max_steps": 2,
        "batch_size": 4,
        "output_dir": str(tmp_path / "report"),
        "methods": ["lora"],
        **changes,
    }
    (tmp_path / "compare.yaml").write_text(json.dumps(settings))
    return load_plan(tmp_path / "compare.yaml")


def test_the_matmul_speed_is_measured_with_the_runs_threads(tmp_path, model_dir, monkeypatch) -> None:
    """On a busy machine every core's thread fighting other programs ran at about half the speed the
    runs (auto threads: the free cores) get, and the plan said 3-4x too long."""
    plan = _plan(tmp_path, model_dir, threads=1)
    seen = []
    monkeypatch.setattr(dry_run, "machine_flops", lambda: seen.append(torch.get_num_threads()) or 1e10)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dry_run.planned_costs(plan, dry_run.check_plan(plan), load_tokenizer(str(model_dir)))
        assert seen == [1] and torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(threads)


def test_threads_of_runs_follows_train(tmp_path, model_dir, monkeypatch) -> None:
    import peftkit.foundation.cpu_load

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(peftkit.foundation.cpu_load, "free_threads", lambda processes=1: 3)
    with runner.threads_of_runs(_plan(tmp_path, model_dir).shared) as threads:
        assert threads == 3 == torch.get_num_threads()
    with runner.threads_of_runs(_plan(tmp_path, model_dir, threads=2).shared) as threads:
        assert threads == 2 == torch.get_num_threads()


def test_decoding_is_counted_for_the_tokens_evaluation_generates(tmp_path, model_dir) -> None:
    """max_new_tokens 0 generates the longest scored reference + ANSWER_MARGIN tokens, not 64."""
    plan = _plan(tmp_path, model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    lengths = dry_run._lengths(plan, tokenizer)
    run = plan.runs[0]
    references = [json.loads(line)["completion"] for line in BUILTIN_TASKS["person-json"].validation.open()][
        :3
    ]
    longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in references)
    assert lengths["reference_max"] == longest
    fixed = run.config.replace(max_new_tokens=longest + ANSWER_MARGIN)
    auto = dry_run._scoring_seconds(run, 1000, lengths, 1e9)
    assert auto == dry_run._scoring_seconds(dataclasses.replace(run, config=fixed), 1000, lengths, 1e9)


def test_scoring_the_base_model_shows_progress(tmp_path, model_dir, capsys) -> None:
    plan = _plan(tmp_path, model_dir, threads=1)
    runner.base_scores(plan, say=lambda text: None)
    assert "eval:" in capsys.readouterr().err  # the progress bar (tqdm, on stderr)
