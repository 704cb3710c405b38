"""peftkit.training.checkpoints: a checkpoint brings back parameters, optimizer, scheduler and RNG exactly."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from torch import nn

from peftkit.foundation.errors import UsageError
from peftkit.training.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)


def small_run(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model[1].requires_grad_(False)  # frozen: not in the checkpoint
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def save(tmp_path, step, model, optimizer, scheduler, keep=2):
    return save_checkpoint(
        tmp_path,
        step,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        rng=rng_state(),
        state={"before": {"loss": 1.5}},
        keep=keep,
        barrier=lambda: None,
        rank=0,
    )


def test_a_loaded_checkpoint_continues_as_the_run_would_have(tmp_path) -> None:
    model, optimizer, scheduler = small_run(0)
    train_steps(model, optimizer, scheduler, 2)
    path = save(tmp_path, 2, model, optimizer, scheduler)
    train_steps(model, optimizer, scheduler, 2)  # its inputs come from the random state saved
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}

    other, other_optimizer, other_scheduler = small_run(1)  # other values everywhere
    state, rng = load_checkpoint(path, other, other_optimizer, other_scheduler, rank=0)
    assert state == {"before": {"loss": 1.5}, "step": 2}
    restore_rng(rng)
    train_steps(other, other_optimizer, other_scheduler, 2)
    for name, param in other.named_parameters():
        assert torch.equal(param, expected[name]), name  # Adam's moments and the lr schedule came back too
    assert other_scheduler.last_epoch == scheduler.last_epoch == 4


def test_the_newest_complete_checkpoints_are_kept(tmp_path) -> None:
    model, optimizer, scheduler = small_run(0)
    for step in (1, 2, 3):
        save(tmp_path, step, model, optimizer, scheduler, keep=2)
    (tmp_path / "checkpoints" / "step-000009").mkdir()  # no state.json: not complete
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000003",
        "step-000009",
    ]
    assert latest_checkpoint(tmp_path).name == "step-000003"
    assert json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["step"] == 3
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_a_checkpoint_of_another_model_or_process_count_is_refused(tmp_path) -> None:
    model, optimizer, scheduler = small_run(0)
    path = save(tmp_path, 1, model, optimizer, scheduler)
    bigger = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"does not fit this model \(missing \['1.bias', '1.weight'\]"):
        load_checkpoint(path, bigger, torch.optim.AdamW(bigger.parameters()), scheduler, rank=0)
    with pytest.raises(ValueError, match="no random state for process 1: resume with as many processes"):
        load_checkpoint(path, model, optimizer, scheduler, rank=1)


def test_rng_state_covers_python_and_torch() -> None:
    state = rng_state()
    expected = (random.random(), torch.rand(2))
    random.random(), torch.rand(5)  # both streams move on
    restore_rng(state)
    again = (random.random(), torch.rand(2))
    assert again[0] == expected[0] and torch.equal(again[1], expected[1])


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng-0.pt"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, damaged: str) -> None:
    model, optimizer, scheduler = small_run(0)
    path = save(tmp_path, 1, model, optimizer, scheduler)
    file = path / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # cut short, as a full disk leaves it
    with pytest.raises(UsageError, match=rf"^{re.escape(str(file))} is damaged .*delete {path}") as caught:
        load_checkpoint(path, model, optimizer, scheduler, rank=0)
    assert "\n" not in str(caught.value)
