"""What a training run reports: the trainable-parameter table, ``metrics.jsonl``, TensorBoard events,
``loss.png`` and the final summary table."""

from __future__ import annotations

import json
import re
import resource
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.foundation.formatting import (
    format_bytes,
    format_count,
    format_duration,
    format_percent,
    format_table,
)
from peftkit.foundation.io import atomic_write
from peftkit.foundation.quantization import logical_numel

if TYPE_CHECKING:
    from peftkit.training.result import TrainResult

__all__ = [
    "MetricsLog",
    "loss_figure",
    "peak_memory",
    "plot_losses",
    "read_metrics",
    "summarize",
    "trainable_table",
]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SUMMARY_EXTRAS = ("reward_margin", "generated_chosen")  # shown after the headline and the loss, if scored


def trainable_table(model: nn.Module) -> str:
    """The trainable parameters grouped by module (layer indices folded into ``*``), with totals.

    Counts are weights (a 4-bit weight's packed bytes count twice: :func:`logical_numel`), as in
    ``count_parameters`` and the run's summary.
    Example row: ``model.layers.*.self_attn.q_proj   30   92,160``.
    """
    from peftkit.model import PeftModel

    strip = "model." if isinstance(model, PeftModel) else ""  # PeftModel keeps the base as .model
    groups: dict[str, list[int]] = {}
    trainable = total = 0
    for name, param in model.named_parameters():
        count = logical_numel(param)
        total += count
        if not param.requires_grad:
            continue
        trainable += count
        module = name.split(".adapters.")[0] if ".adapters." in name else name.rsplit(".", 1)[0]
        key = re.sub(r"\.\d+(?=\.|$)", ".*", module.removeprefix(strip))
        entry = groups.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += count
    rows: list[list[Any]] = [[key, n, p] for key, (n, p) in groups.items()]
    share = 100 * trainable / max(total, 1)
    rows.append(["total trainable", "", trainable])
    rows.append(["total parameters", "", total])
    body = format_table(rows, header=["module", "tensors", "params"])
    counts = f"{trainable:,} ({format_count(trainable)}) of {total:,} ({format_count(total)})"
    return f"{body}\ntrainable: {counts}, {format_percent(share)}"


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (and TensorBoard when installed), flushing each one.

    Args:
        directory: the run's output directory.
        tensorboard: write TensorBoard events to ``directory/tensorboard`` if tensorboard is installed.
    """

    def __init__(self, directory: Path, tensorboard: bool = True) -> None:
        self.path = directory / METRICS_FILE
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self._writer = SummaryWriter(str(directory / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """Log one record: ``{"step": int, "split": "train" | "eval", name: number, ...}``."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if (
                    name not in ("step", "split")
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    self._writer.add_scalar(f"{record['split']}/{name}", value, record["step"])

    def close(self) -> None:
        """Flush and close the files."""
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (none if it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after ``last_step`` (a resumed run rewrites what followed its checkpoint)."""
    kept = [r for r in read_metrics(path) if r["step"] <= last_step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))


def plot_losses(records: Iterable[dict[str, Any]], path: Path, title: str = "") -> None:
    """Draw :func:`loss_figure` into a PNG at ``path``."""
    fig = loss_figure(records, title)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def loss_figure(records: Iterable[dict[str, Any]], title: str = "") -> Any:
    """The training loss per step (a line) and the evaluation loss per evaluation (points, joined only
    when there are evaluations between the first and the last: two points make no curve).

    Returns:
        the matplotlib ``Figure``; close it with ``plt.close(fig)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    evals = [(r["step"], r["loss"]) for r in records if r["split"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-" if len(evals) > 2 else "o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def summarize(result: TrainResult, train_time: float) -> tuple[str, dict[str, Any]]:
    """The final summary table of a run and its JSON form (``summary.json``)."""
    share = 100 * result.trainable / max(result.total, 1)
    rows: list[list[Any]] = [
        [
            "trainable params",
            f"{result.trainable:,} of {format_count(result.total)} ({format_percent(share)})",
        ],
        ["steps", f"{result.steps}"],
        ["wall time", _times_text(result.wall_time_s, train_time, result.sessions)],
        ["tokens/s", f"{result.tokens_per_s:.0f} (training, all processes)"],
        ["tokens", _tokens_text(result)],
        ["peak memory", _memory_text(result.peak_memory_bytes)],
    ]
    for name in dict.fromkeys([result.metric, "loss", *SUMMARY_EXTRAS]):
        if name in result.before or name in result.after:
            before, after = _num(result.before.get(name)), _num(result.after.get(name))
            rows.append([f"{name} (held-out)", f"{before} -> {after}"])
    rows.append(["output", str(result.output_dir)])
    summary = {
        "metric": result.metric,
        "before": _numbers(result.before),
        "after": _numbers(result.after),
        "trainable": result.trainable,
        "total": result.total,
        "steps": result.steps,
        "wall_time_s": result.wall_time_s,
        "train_time_s": train_time,
        "sessions": result.sessions,
        "tokens_per_s": result.tokens_per_s,
        "tokens": result.tokens,
        "padding_tokens": result.padding_tokens,
        "fill": _fill(result),
        "truncated": result.data.stats.get("truncated", 0) if result.data is not None else 0,
        "peak_memory_bytes": result.peak_memory_bytes,
    }
    return "\nsummary\n" + format_table(rows), summary


def _fill(result: TrainResult) -> float:
    """The share of real tokens among those computed (1.0: no padding)."""
    return result.tokens / max(result.tokens + result.padding_tokens, 1)


def _tokens_text(result: TrainResult) -> str:
    """Real and padding tokens, the fill, and the examples truncated to max_length."""
    text = (
        f"{format_count(result.tokens)} real + {format_count(result.padding_tokens)} padding "
        f"(fill {_fill(result):.0%})"
    )
    data = result.data
    if data is not None and data.padding_free:
        text += f"; {data.stats['examples']} examples, each batch's laid end to end"
    elif data is not None and data.packed:
        text += f"; {data.stats['examples']} examples packed into {data.stats['packed_rows']} rows"
    truncated = data.stats.get("truncated", 0) if data is not None else 0
    return text + (f"; {truncated} examples truncated to max_length" if truncated else "")


def _times_text(wall: float, training: float, sessions: int) -> str:
    """``"2m10s (training 1m40s)"``, saying so when the times add up the sessions of a resumed run."""
    times = f"{format_duration(wall)} (training {format_duration(training)}"
    return times + (f"; both since step 0, over {sessions} sessions)" if sessions > 1 else ")")


def peak_memory() -> int:
    """Peak accelerator memory (CUDA) or this process's peak resident memory (CPU), in bytes."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _memory_text(size: int) -> str:
    where = "CUDA, allocated" if torch.cuda.is_available() else "process RSS"
    return f"{format_bytes(size)} ({where})"


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def _numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
