"""peftkit.training.reports: the loss plot and the trainable share as people read them."""

from __future__ import annotations

import pytest

from peftkit.training.reports import loss_figure, trainable_table


def _records(eval_steps: list[int]) -> list[dict]:
    train = [{"step": s, "split": "train", "loss": 3.0 / s} for s in range(1, 11)]
    return train + [{"step": s, "split": "eval", "loss": 2.0 / (s + 1)} for s in eval_steps]


@pytest.mark.parametrize(("eval_steps", "joined"), [([0, 10], False), ([0, 5, 10], True)])
def test_eval_loss_is_points_unless_evaluations_lie_between(eval_steps: list[int], joined: bool) -> None:
    import matplotlib.pyplot as plt

    fig = loss_figure(_records(eval_steps))
    try:
        lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
        assert lines["train loss"].get_linestyle() == "-"
        evals = lines["eval loss"]
        assert list(evals.get_xdata()) == eval_steps and evals.get_marker() == "o"
        assert evals.get_linestyle() == ("-" if joined else "None")
    finally:
        plt.close(fig)


def test_trainable_table_shows_a_tiny_share_with_significant_digits() -> None:
    from torch import nn

    model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1, 1))  # 1,001,002 parameters
    model[0].requires_grad_(False)  # 2 trainable: 0.0001998%
    assert trainable_table(model).splitlines()[-1] == "trainable: 2 (2) of 1,001,002 (1.00M), 0.00020%"
