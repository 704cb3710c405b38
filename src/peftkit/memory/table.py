"""The side-by-side table of an estimate (``peftkit estimate``, ``peftkit train --estimate-only``)."""

from __future__ import annotations

from peftkit.foundation.formatting import format_bytes, format_count, format_percent
from peftkit.memory.estimate import GIB, MemoryEstimate

__all__ = ["format_estimate"]


def format_estimate(result: MemoryEstimate) -> str:
    """The side-by-side table :func:`main` prints."""
    rows = [
        (
            "trainable parameters",
            lambda b: (
                f"{format_count(b.trainable_parameters)} "
                f"({format_percent(_share(b.trainable_parameters, result))})"
            ),
        ),
        ("weights", lambda b: format_bytes(b.weights)),
        ("gradients", lambda b: format_bytes(b.gradients)),
        ("optimizer states", lambda b: format_bytes(b.optimizer_states)),
        ("activations", lambda b: format_bytes(b.activations)),
        ("temporaries at peak", lambda b: format_bytes(b.temporaries)),
        ("peak", lambda b: f"{format_bytes(b.peak)} ({b.weights_multiple:.1f}x weights)"),
    ]
    if result.device_memory is not None:
        verdict = {True: "fits", False: "does not fit"}
        rows.append((f"in {result.device_memory / GIB:.3g} GiB", lambda b: verdict[bool(result.fits(b))]))
    shape = f"batch {result.batch} x seq {result.seq}"
    if result.sequences_per_example == 2:
        shape = f"{result.objective}: batch {result.batch} pairs x 2 sequences of {result.seq} tokens"
    header = (
        f"{result.model}: {format_count(result.total_parameters)} parameters, {shape}, {result.dtype}, "
        f"{result.optimizer}" + (", gradient checkpointing" if result.grad_checkpointing else "")
    )
    columns = [result.full, result.peft]
    cells = [[label] + [render(b) for b in columns] for label, render in rows]
    titles = ["", *(b.label for b in columns)]
    widths = [max(len(row[i]) for row in [titles, *cells]) for i in range(3)]
    lines = [header, "  ".join(t.ljust(w) for t, w in zip(titles, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.append("peak: weights + optimizer states + the larger of (activations + temporaries) and gradients")
    if result.sequences_per_example == 2:
        lines.append(
            "pairs: chosen and rejected with gradients; DPO's reference pass runs once before training, "
            "without gradients (below this peak)"
        )
    return "\n".join(lines)


def _share(count: int, result: MemoryEstimate) -> float:
    return 100 * count / result.total_parameters
