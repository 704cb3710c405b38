"""The report of ``peftkit compare``: ``report.md`` (one table), ``report.json`` and PNG charts.

Columns (one row per method, the base model first):

- **trainable**: parameters that received gradients, and their share of the model's parameters;
- **saved**: bytes of the ``.safetensors`` files the method wrote (an adapter, or the whole model for
  full fine-tuning), and that size as a fraction of the base model's full checkpoint;
- **est. / measured peak**: predicted (:func:`peftkit.memory.estimate`, full fine-tuning and LoRA only)
  and measured peak memory of one training step on the first training batch with the model's own
  loss (whole logits, as the estimate assumes; tracked tensors on CPU, ``max_memory_allocated`` on
  CUDA); not the process's resident memory;
- **s/step, tokens/s**: training time only (evaluation and saving excluded);
- the headline metric before (the base model) and after training, the held-out loss, and
  **forgetting**: the change of the loss on a general text the task did not train on (positive: the
  model got worse at it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit.compare.plan import ComparePlan, describe
from peftkit.foundation.formatting import MIB, format_bytes, format_percent
from peftkit.foundation.io import atomic_write

__all__ = ["CHARTS", "REPORT_JSON", "REPORT_MD", "comparison_table", "write_report"]

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
CHARTS = ("methods.png", "rank_sweep.png")


def write_report(plan: ComparePlan, base: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write report.md, report.json and the charts for the finished ``rows``; returns report.json's data."""
    sweep = [row for name in plan.sweep for row in rows if row["name"] == name]
    charts = []
    if rows:
        _plot_methods(base, rows, plan.output_dir / CHARTS[0])
        charts.append(CHARTS[0])
    if len(sweep) >= 2:
        _plot_sweep(base, sweep, plan.output_dir / CHARTS[1])
        charts.append(CHARTS[1])
    data = {
        "settings": {k: v for k, v in plan.shared.to_dict().items() if k not in ("method", "method_options")},
        "general_text": str(plan.general_text),
        "metric": base["metric"],
        "base": base,
        "methods": rows,
        "pending": [run.name for run in plan.runs if run.name not in {row["name"] for row in rows}],
        "rank_sweep": [row["name"] for row in sweep],
        "charts": charts,
    }
    text = json.dumps(data, indent=1, default=str)
    atomic_write(plan.output_dir / REPORT_JSON, lambda tmp: tmp.write_text(text))
    markdown = _markdown(plan, base, rows, sweep, charts, data["pending"])
    atomic_write(plan.output_dir / REPORT_MD, lambda tmp: tmp.write_text(markdown))
    return data


def comparison_table(base: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The report's Markdown table: the base model, then one row per method."""
    metric = base["metric"]
    header = [
        "method",
        "trainable",
        "% of params",
        "saved",
        "vs full ckpt",
        "est. peak",
        "measured peak",
        "s/step",
        "tokens/s",
        f"{metric} (base → after)",
        "held-out loss",
        "forgetting",
    ]
    rouge = "rouge1" in base["scores"]
    if rouge:
        header.insert(10, "ROUGE-1/2/L after")
    full = base["checkpoint_bytes"]
    before = base["scores"].get(metric)
    first = ["base (no training)", "0", "0", *["–"] * 6, _num(before), _num(base["scores"].get("loss")), "–"]
    if rouge:
        first.insert(10, _rouge(base["scores"]))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(first) + " |"]
    for row in rows:
        if row.get("stopped"):
            lines.append(f"| {row['name']} | stopped: {row['stopped']} |" + " |" * (len(header) - 2))
            continue
        measured = row.get("measured_memory", {}).get("peak")
        cells = [
            row["name"],
            f"{row['trainable_parameters']:,}",
            format_percent(row["trainable_percent"]),
            format_bytes(row["saved_bytes"]),
            f"{row['saved_bytes'] / full:.2%}" if full else "–",
            format_bytes(row.get("estimated_peak_bytes")),
            format_bytes(measured),
            f"{row['seconds_per_step']:.2f}",
            f"{row['tokens_per_s']:.0f}",
            f"{_num(before)} → {_num(row['scores'].get(metric))}",
            _num(row["scores"].get("loss")),
            _signed(row.get("forgetting")),
        ]
        if rouge:
            cells.insert(10, _rouge(row["scores"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(
    plan: ComparePlan,
    base: dict[str, Any],
    rows: list[dict[str, Any]],
    sweep: list[dict[str, Any]],
    charts: list[str],
    pending: list[str],
) -> str:
    shared = plan.shared
    parts = [
        "# peftkit compare",
        "",
        f"Model `{shared.model}` ({base['total_parameters']:,} parameters, {shared.dtype}), data "
        f"`{shared.data}` ({base['training_rows']} training rows, {base['validation_rows']} held-out rows, "
        f"{shared.eval_examples} scored by generation). Every method: {shared.max_steps or shared.epochs} "
        f"{'steps' if shared.max_steps else 'epochs'} of batch {shared.batch_size} x {shared.grad_accum}, "
        f"seed {shared.seed}. Forgetting: change of the loss on `{plan.general_text.name}`.",
        "",
        comparison_table(base, rows),
        "",
    ]
    if pending:
        parts += [f"Not run yet: {', '.join(pending)}.", ""]
    parts += ["## Methods", ""]
    parts += [f"- **{run.name}**: {describe(run)}" for run in plan.runs]
    if sweep:
        parts += ["", "## Rank sweep", "", _sweep_table(base, sweep)]
    parts += ["", *[f"![{chart}]({chart})" for chart in charts]]
    parts += ["", _column_notes()]
    return "\n".join(parts) + "\n"


def _sweep_table(base: dict[str, Any], sweep: list[dict[str, Any]]) -> str:
    metric = base["metric"]
    lines = [
        f"| rank | trainable | {metric} | measured peak | est. peak | s/step |",
        "|---|---|---|---|---|---|",
    ]
    for row in sweep:
        peak = row.get("measured_memory", {}).get("peak")
        score = _num(row.get("scores", {}).get(metric))
        estimated, measured = format_bytes(row.get("estimated_peak_bytes")), format_bytes(peak)
        lines.append(
            f"| {row['rank']} | {row['trainable_parameters']:,} | {score} | {measured} | {estimated} | "
            f"{row['seconds_per_step']:.2f} |"
        )
    return "\n".join(lines)


def _column_notes() -> str:
    return (
        "Columns: *saved* is the size of the method's `.safetensors` files (the whole model for full "
        "fine-tuning); *est. peak* is `peftkit.memory.estimate` for the measured batch's shape (full "
        "fine-tuning and plain LoRA only); *measured peak* is one training step on the first batch with "
        "the model's own loss, whole logits as the estimate assumes (parameters, gradients, optimizer "
        "state and live tensors; not the process's RSS; `peftkit train`'s fused loss holds less); "
        "*s/step* and *tokens/s* count training steps only; *forgetting* is the loss on the general text "
        "after training minus the base model's (positive: worse)."
    )


def _plot_methods(base: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    """Six bar charts, a bar per method: metric, trainable %, saved size, peak memory, s/step, forgetting."""
    plt = _pyplot()
    rows = [row for row in rows if not row.get("stopped")]
    metric = base["metric"]
    names = [row["name"] for row in rows]
    panels = [
        (f"{metric} after training (line: base)", [row["scores"].get(metric, 0.0) for row in rows], "linear"),
        ("trainable parameters (% of model)", [row["trainable_percent"] for row in rows], "log"),
        ("saved files (MiB)", [row["saved_bytes"] / MIB for row in rows], "log"),
        ("measured peak memory (MiB)", [row["measured_memory"]["peak"] / MIB for row in rows], "linear"),
        ("seconds per training step", [row["seconds_per_step"] for row in rows], "linear"),
        ("forgetting: general-text loss change", [row.get("forgetting") or 0.0 for row in rows], "linear"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (title, values, scale) in zip(axes.flat, panels, strict=True):
        ax.bar(range(len(names)), values, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if scale == "log" and all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    before = base["scores"].get(metric)
    if before is not None:
        axes.flat[0].axhline(before, color="black", linestyle="--", linewidth=1)
    estimates = [row.get("estimated_peak_bytes") for row in rows]
    points = [(i, e / MIB) for i, e in enumerate(estimates) if e]
    if points:
        axes.flat[3].plot(*zip(*points, strict=True), "o", color="tab:orange", label="estimate")
        axes.flat[3].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, plt)


def _plot_sweep(base: dict[str, Any], sweep: list[dict[str, Any]], path: Path) -> None:
    """Metric, peak memory and trainable parameters against the LoRA rank (log2 axis)."""
    plt = _pyplot()
    sweep = [row for row in sweep if not row.get("stopped")]
    metric = base["metric"]
    ranks = [row["rank"] for row in sweep]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(ranks, [row["scores"].get(metric, 0.0) for row in sweep], "o-")
    if base["scores"].get(metric) is not None:
        axes[0].axhline(base["scores"][metric], color="black", linestyle="--", linewidth=1, label="base")
        axes[0].legend(fontsize=8)
    axes[0].set_title(f"{metric} after training", fontsize=10)
    axes[1].plot(ranks, [row["measured_memory"]["peak"] / MIB for row in sweep], "o-", label="measured")
    estimated = [
        (row["rank"], row["estimated_peak_bytes"] / MIB) for row in sweep if row.get("estimated_peak_bytes")
    ]
    if estimated:
        axes[1].plot(*zip(*estimated, strict=True), "s--", label="estimate")
    axes[1].set_title("peak memory of a training step (MiB)", fontsize=10)
    axes[1].set_ylim(bottom=0)  # from zero: the adapter is a small part of the peak
    axes[1].legend(fontsize=8)
    axes[2].plot(ranks, [row["trainable_parameters"] for row in sweep], "o-")
    axes[2].set_yscale("log")
    axes[2].set_title("trainable parameters", fontsize=10)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path, plt)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, plt: Any) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def _num(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}"


def _rouge(scores: dict[str, float]) -> str:
    return "/".join(f"{scores.get(name, float('nan')):.3f}" for name in ("rouge1", "rouge2", "rougeL"))


def _signed(value: Any) -> str:
    return "–" if value is None else f"{value:+.3f}"
