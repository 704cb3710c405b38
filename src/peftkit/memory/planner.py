"""What fits: full fine-tuning, LoRA and QLoRA, with and without gradient checkpointing, in a memory
budget, each with the largest batch that fits (``peftkit estimate MODEL --budget 8GiB``).

Every row is :func:`~peftkit.memory.estimate.estimate` on the meta device (no weights), so a 70B config
is planned in seconds. The peak grows about linearly with the batch, so a row's largest batch starts
from the estimates at batch 1 and 2 and is then searched exactly (the largest that fits, the next one
does not).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from peftkit.foundation.errors import UsageError
from peftkit.foundation.formatting import format_bytes
from peftkit.memory.estimate import GIB, estimate

__all__ = ["PlanRow", "format_plan", "parse_size", "plan"]

# (label, estimate column, quantization): preferred first (fewer approximations of full training)
METHODS = (
    ("full fine-tuning", "full", None),
    ("LoRA", "peft", None),
    ("QLoRA int8", "peft", "int8"),
    ("QLoRA nf4", "peft", "nf4"),
)
MAX_BATCH = 4096
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?)?\s*", re.IGNORECASE)
_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True)
class PlanRow:
    """One way to train: the largest batch that fits the budget (0: not even one row) and its peak."""

    method: str
    quantize: str | None
    gradient_checkpointing: bool
    batch: int
    peak: int  # at ``batch``, or at batch 1 when nothing fits
    reason: str = ""


def parse_size(text: str) -> int:
    """``"8GiB"``, ``"8 GB"``, ``"500MiB"`` or ``"8"`` (GiB) → bytes (binary units throughout).

    Raises:
        UsageError: not a size.
    """
    match = _SIZE.fullmatch(text)
    if not match:
        raise UsageError(f"budget {text!r} is not a size; write e.g. 8GiB, 24GB or 500MiB")
    unit = (match.group(2) or "g")[0].lower()
    return int(float(match.group(1)) * _UNITS[unit])


def plan(model_or_config: Any, budget: int, seq: int, **settings: Any) -> list[PlanRow]:
    """Every method × gradient checkpointing, best first: those that fit (by preference: full
    fine-tuning, LoRA, QLoRA int8, QLoRA nf4; without checkpointing before with), then the rest.

    Args:
        budget: bytes available for training tensors.
        seq: tokens per row.
        settings: passed to :func:`estimate` (``dtype``, ``optimizer``, ``method`` for the LoRA
            settings, ``loss``...).
    """
    rows = []
    for method, column, quantize in METHODS:
        for checkpointing in (False, True):
            batch, peak = _largest_batch(
                model_or_config, budget, seq, column, quantize, checkpointing, settings
            )
            rows.append(PlanRow(method, quantize, checkpointing, batch, peak))
    fitting = [row for row in rows if row.batch > 0]
    best = fitting[0] if fitting else None
    return [_with_reason(row, best, budget) for row in fitting + [r for r in rows if r.batch == 0]]


def _largest_batch(
    model_or_config: Any,
    budget: int,
    seq: int,
    column: str,
    quantize: str | None,
    checkpointing: bool,
    settings: dict[str, Any],
) -> tuple[int, int]:
    def peak(batch: int) -> int:
        result = estimate(
            model_or_config,
            batch=batch,
            seq=seq,
            quantize=quantize,
            grad_checkpointing=checkpointing,
            **settings,
        )
        return getattr(result, column).peak

    one = peak(1)
    if one > budget:
        return 0, one
    slope = max(peak(2) - one, 1)
    guess = min(MAX_BATCH, 1 + (budget - one) // slope)  # exact while one term of the peak dominates
    while guess > 1 and peak(guess) > budget:
        guess = max(1, guess * 9 // 10)
    fits, step = guess, 1  # then up: double the step while it fits, and bisect the last step
    while fits + step <= MAX_BATCH and peak(fits + step) <= budget:
        fits, step = fits + step, step * 2
    low, high = fits, min(fits + step, MAX_BATCH + 1)  # low fits; high does not (or is past the cap)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if peak(middle) <= budget else (low, middle)
    return low, peak(low)


def _with_reason(row: PlanRow, best: PlanRow | None, budget: int) -> PlanRow:
    if row.batch == 0:
        reason = f"does not fit: {format_bytes(row.peak)} at batch 1"
    elif row is best:
        reason = "best: the least approximation of full training that fits"
    elif best is not None and row.method != best.method:
        reason = f"fits, but {best.method} fits too"
    else:
        reason = "fits, but checkpointing recomputes the forward (slower)"
    return PlanRow(row.method, row.quantize, row.gradient_checkpointing, row.batch, row.peak, reason)


def format_plan(rows: list[PlanRow], model: str, budget: int, seq: int, objective: str = "sft") -> str:
    """The plan as a table, best row first (a preference objective's batch counts pairs)."""
    shape = (
        f"rows of {seq} tokens" if objective == "sft" else f"{objective} pairs of 2 sequences of {seq} tokens"
    )
    header = f"{model}: what fits in {budget / GIB:.3g} GiB, {shape}"
    cells = [["method", "checkpointing", "largest batch", "peak", "why"]]
    for row in rows:
        cells.append(
            [
                row.method,
                "on" if row.gradient_checkpointing else "off",
                str(row.batch) if row.batch else "-",
                format_bytes(row.peak),
                row.reason,
            ]
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = [header] + [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    ]
    return "\n".join(lines)
