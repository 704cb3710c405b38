"""Write a second small task for the adapter-arithmetic benchmark: a date in words → DD/MM/YYYY.

Run ``python scripts/make_dates_task.py`` to regenerate ``benchmarks/data/dates/`` (seeded: the same
files every time): 400 training and 100 held-out rows of ``{"prompt", "completion"}``, e.g.
``"the 5th of March, 2021"`` → ``"05/03/2021"``. The instruction is not in the rows; train with
``--prompt-template "Write the date as DD/MM/YYYY.\\n\\n{prompt}"``. Held-out rows use years (2031–2040)
that no training row has, so the score measures the conversion, not memorised dates.

Not ISO 8601 (``2021-03-05``) on purpose: ``datasets`` reads a JSON column of ISO dates as timestamps,
and the answers would become ``"2021-03-05 00:00:00"``.
"""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "dates"
MONTHS = [datetime.date(2000, m, 1).strftime("%B") for m in range(1, 13)]


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def spell(date: datetime.date, rng: random.Random) -> str:
    """One of several English spellings of ``date`` (day and month never ambiguous)."""
    month = MONTHS[date.month - 1]
    forms = [
        f"{month} {date.day}, {date.year}",
        f"{date.day} {month} {date.year}",
        f"the {ordinal(date.day)} of {month}, {date.year}",
        f"{month[:3]} {date.day}, {date.year}",
        f"{date.year}, {month} {ordinal(date.day)}",
        f"{date.strftime('%A')}, {month} {date.day}, {date.year}",
    ]
    return rng.choice(forms)


def rows(years: range, count: int, rng: random.Random) -> list[dict[str, str]]:
    out = []
    for _ in range(count):
        start = datetime.date(years.start, 1, 1)
        span = (datetime.date(years.stop, 1, 1) - start).days
        date = start + datetime.timedelta(days=rng.randrange(span))
        out.append({"prompt": spell(date, rng), "completion": date.strftime("%d/%m/%Y")})
    return out


def main() -> None:
    rng = random.Random(12)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, years, count in (("train", range(1950, 2031), 400), ("test", range(2031, 2041), 100)):
        text = "".join(json.dumps(row) + "\n" for row in rows(years, count, rng))
        (OUT / f"{name}.jsonl").write_text(text)
    print(f"wrote {OUT}/train.jsonl (400 rows) and test.jsonl (100 rows)")


if __name__ == "__main__":
    main()
