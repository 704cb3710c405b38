"""peftkit.foundation.formatting: numbers as every report writes them."""

from __future__ import annotations

import pytest

from peftkit.foundation.formatting import format_percent


@pytest.mark.parametrize(
    ("percent", "text"),
    [
        (0.3412, "0.34%"),  # LoRA r=8 on q/v of SmolLM2-135M
        (5.3, "5.30%"),
        (100, "100.00%"),
        (0.026, "0.026%"),  # LN tuning
        (0.00864, "0.0086%"),  # prompt tuning, n=20: two decimals would say 0.00%
        (0.099, "0.099%"),
        (1.2e-5, "0.000012%"),
        (0, "0%"),
    ],
)
def test_format_percent_keeps_two_significant_digits(percent: float, text: str) -> None:
    assert format_percent(percent) == text
