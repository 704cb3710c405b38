"""The "what fits" planner: each row's batch is the largest whose estimated peak fits the budget
(checked against :func:`peftkit.memory.estimate` directly, one batch more must not fit), best first."""

from __future__ import annotations

import pytest

from peftkit.cli import main
from peftkit.foundation.errors import UsageError
from peftkit.memory import estimate
from peftkit.memory.planner import METHODS, format_plan, parse_size, plan

from helpers.tiny_lm import llama_70b_config, tiny_llama_config

GIB = 2**30


def peak(config, row, batch: int) -> int:
    column = "full" if row.method == "full fine-tuning" else "peft"
    result = estimate(
        config, batch=batch, seq=64, quantize=row.quantize, grad_checkpointing=row.gradient_checkpointing
    )
    return getattr(result, column).peak


@pytest.mark.parametrize("budget_mib", [3, 6, 40])
def test_each_row_has_the_largest_batch_that_fits(budget_mib: int) -> None:
    config = tiny_llama_config()
    budget = budget_mib * 2**20
    rows = plan(config, budget, seq=64)
    assert len(rows) == 2 * len(METHODS)
    for row in rows:
        if row.batch == 0:
            assert peak(config, row, 1) > budget and "does not fit" in row.reason
        else:
            assert peak(config, row, row.batch) <= budget
            assert row.batch == 4096 or peak(config, row, row.batch + 1) > budget
    fitting = [row.batch > 0 for row in rows]
    assert fitting == sorted(fitting, reverse=True)  # rows that fit come first
    if any(fitting):
        assert rows[0].reason.startswith("best")


def test_sizes_parse_in_binary_units_and_bad_ones_are_refused() -> None:
    assert parse_size("8GiB") == parse_size("8 GB") == parse_size("8") == 8 * GIB
    assert parse_size("500MiB") == 500 * 2**20 and parse_size("1.5g") == int(1.5 * GIB)
    with pytest.raises(UsageError, match=r"is not a size; write e\.g\. 8GiB"):
        parse_size("lots")


def test_peftkit_estimate_budget_prints_the_plan(tmp_path, capsys) -> None:
    tiny_llama_config().save_pretrained(tmp_path)
    assert main(["estimate", str(tmp_path), "--budget", "6MiB", "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    rows = plan(tiny_llama_config(), 6 * 2**20, seq=64, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert out.splitlines()[2:] == format_plan(rows, str(tmp_path), 6 * 2**20, 64).splitlines()[2:]
    assert main(["estimate", str(tmp_path), "--budget", "lots"]) == 2


@pytest.mark.slow
def test_a_70b_config_is_planned_without_weights() -> None:
    rows = plan(llama_70b_config(), 48 * GIB, seq=1024, dtype="bfloat16")
    best = rows[0]
    assert best.method == "QLoRA nf4" and best.batch >= 1  # 70B only fits in 48 GiB with a 4-bit base
    assert all(row.batch == 0 for row in rows if row.method in ("full fine-tuning", "LoRA"))


def test_a_preference_objective_plans_pairs() -> None:
    """A pair is two sequences with gradients: the largest batch of pairs is about half that of rows."""
    rows = plan(tiny_llama_config(), 6 * 2**20, seq=64)
    pairs = plan(tiny_llama_config(), 6 * 2**20, seq=64, objective="dpo", padded=True)
    by_row = {
        (r.method, r.gradient_checkpointing): r.batch
        for r in plan(tiny_llama_config(), 6 * 2**20, seq=64, padded=True)
    }
    for row in pairs:
        assert row.batch <= by_row[(row.method, row.gradient_checkpointing)] // 2 + 1
    assert any(r.batch > 0 for r in pairs) and len(pairs) == len(rows)
    assert "dpo pairs of 2 sequences of 64 tokens" in format_plan(pairs, "tiny", 6 * 2**20, 64, "dpo")
