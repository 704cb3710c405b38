"""How peftkit writes counts, sizes and durations for people: one place, so every report agrees."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["format_bytes", "format_count", "format_duration", "format_percent", "format_table"]

KIB, MIB, GIB = 1024, 1024**2, 1024**3


def format_count(count: float) -> str:
    """A parameter or token count with an SI suffix: ``1234567`` → ``"1.23M"``, ``950`` → ``"950"``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}"
    return f"{count:.0f}"


def format_percent(percent: float) -> str:
    """A percentage with two decimals, or two significant digits when smaller: ``0.3412`` → ``"0.34%"``,
    ``0.00864`` → ``"0.0086%"`` (prompt tuning's share, which two decimals would print as 0.00%),
    ``100`` → ``"100.00%"``, ``0`` → ``"0%"``."""
    if percent == 0:
        return "0%"
    decimals = max(2, 1 - math.floor(math.log10(abs(percent))))
    return f"{percent:.{decimals}f}%"


def format_bytes(size: float | None) -> str:
    """A size in binary units: ``"3.00 GiB"``, ``"12.5 MiB"``, ``"46 KiB"``; ``None`` → ``"–"``."""
    if size is None:
        return "–"
    if abs(size) >= GIB:
        return f"{size / GIB:.2f} GiB"
    if abs(size) >= MIB:
        return f"{size / MIB:.1f} MiB"
    return f"{size / KIB:.0f} KiB"


def format_duration(seconds: float) -> str:
    """``4.2`` → ``"4.2s"``, ``185`` → ``"3m05s"``, ``5520`` → ``"1h32m"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """Rows as left-aligned text columns (numbers right-aligned), two spaces apart."""
    all_rows = [list(map(str, header))] if header else []
    all_rows += [[f"{c:,}" if isinstance(c, int) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in all_rows if i < len(row)) for i in range(len(all_rows[0]))]
    numeric = [
        all(_is_number(r[i]) for r in all_rows[1 if header else 0 :] if i < len(r))
        for i in range(len(widths))
    ]
    lines = []
    for row in all_rows:
        cells = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=False)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"-?[\d,.]+%?|", text))
