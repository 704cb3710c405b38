"""peftkit.compare.report.comparison_table on hand-made rows: columns, ratios, ROUGE, a stopped method."""

from __future__ import annotations

from peftkit.compare.report import comparison_table

MIB = 1024**2


def base(**scores) -> dict:
    return {"metric": "rouge1", "checkpoint_bytes": 200 * MIB, "scores": {"loss": 2.5, **scores}}


def row(name: str, **changes) -> dict:
    values = {
        "name": name,
        "trainable_parameters": 1_000_000,
        "trainable_percent": 0.5,
        "saved_bytes": 4 * MIB,
        "estimated_peak_bytes": 3 * 1024**3,
        "measured_memory": {"peak": 1536 * MIB},
        "seconds_per_step": 2.345,
        "tokens_per_s": 812.4,
        "scores": {"loss": 1.25, "rouge1": 0.4, "rouge2": 0.15, "rougeL": 0.33},
        "forgetting": 0.0421,
    }
    return {**values, **changes}


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_a_method_row_has_its_numbers_in_the_right_columns() -> None:
    lines = comparison_table(base(rouge1=0.2, rouge2=0.05, rougeL=0.18), [row("lora")]).splitlines()
    header = cells(lines[0])
    assert header[10] == "ROUGE-1/2/L after" and header[9] == "rouge1 (base → after)"
    values = dict(zip(header, cells(lines[3]), strict=True))
    assert values["method"] == "lora"
    assert values["trainable"] == "1,000,000" and values["% of params"] == "0.50%"
    assert values["saved"] == "4.0 MiB" and values["vs full ckpt"] == "2.00%"  # 4 of 200 MiB
    assert values["est. peak"] == "3.00 GiB" and values["measured peak"] == "1.50 GiB"
    assert values["s/step"] == "2.35" and values["tokens/s"] == "812"
    assert values["rouge1 (base → after)"] == "0.2 → 0.4"
    assert values["ROUGE-1/2/L after"] == "0.400/0.150/0.330"
    assert values["held-out loss"] == "1.25" and values["forgetting"] == "+0.042"
    base_values = dict(zip(header, cells(lines[2]), strict=True))
    assert base_values["ROUGE-1/2/L after"] == "0.200/0.050/0.180" and base_values["held-out loss"] == "2.5"


def test_no_rouge_column_for_exact_match_and_missing_estimates_show_a_dash() -> None:
    exact = {"metric": "exact_match", "checkpoint_bytes": MIB, "scores": {"loss": 1.0, "exact_match": 0.1}}
    method = row(
        "prompt",
        estimated_peak_bytes=None,
        forgetting=None,
        saved_bytes=46 * 1024,
        trainable_percent=0.00864,
        scores={"loss": 0.9, "exact_match": 0.5},
    )
    lines = comparison_table(exact, [method]).splitlines()
    header = cells(lines[0])
    assert "ROUGE-1/2/L after" not in header and len(header) == 12
    values = dict(zip(header, cells(lines[2 + 1]), strict=True))
    assert values["est. peak"] == "–" and values["forgetting"] == "–" and values["saved"] == "46 KiB"
    assert values["exact_match (base → after)"] == "0.1 → 0.5"
    assert values["% of params"] == "0.0086%"  # prompt tuning's share, not 0.00%


def test_a_stopped_method_says_why() -> None:
    lines = comparison_table(base(), [row("full", stopped="non-finite")]).splitlines()
    assert "stopped: non-finite" in lines[3] and lines[3].count("|") == lines[0].count("|")
