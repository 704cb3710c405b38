"""peftkit.training.inspection: the module table of ``peftkit inspect`` (its whole report: tests/cli)."""

from __future__ import annotations

import pytest
from torch import nn

from peftkit.foundation.errors import UsageError
from peftkit.training.inspection import module_table


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2, bias=False)))


def test_one_row_per_leaf_module_with_its_weight_shape_and_parameters() -> None:
    lines = module_table(small_model()).splitlines()
    assert lines[0].split() == ["module", "type", "weight", "params"]
    rows = [line.split() for line in lines[1:]]
    assert rows == [["0", "Linear", "3x4", "15"], ["1", "ReLU", "-", "0"], ["2.0", "Linear", "2x3", "6"]]


def test_the_filter_is_a_regular_expression_on_names() -> None:
    rows = [line.split()[0] for line in module_table(small_model(), r"^2\.").splitlines()[1:]]
    assert rows == ["2.0"]
    assert module_table(small_model(), "attention") == "no module name matches 'attention'"
    with pytest.raises(UsageError, match=r"--filter '\(' is not a valid regular expression"):
        module_table(small_model(), "(")
