"""peftkit.training.optimization: each --optimizer / --lr-scheduler builds what it names.

References: torch's own schedulers (LinearLR for the warm-up, then CosineAnnealingLR, LinearLR or
ConstantLR; relative 1e-9, since torch computes them recursively), hand-computed learning rates, and,
for the default, the AdamW + LambdaLR that the training loop built inline before this seam existed
(equal bit for bit).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import peftkit
from peftkit.foundation.errors import UsageError
from peftkit.training.method_choice import build_method_config
from peftkit.training.optimization import build_optimizer, build_scheduler, check_optimizer, lr_factor
from peftkit.training.train_config import load_config

from helpers.tiny_lm import build_model

LR, WARMUP, TOTAL = 0.5, 3, 12


def settings(**changes):
    return load_config(None, {"lr": LR, "warmup_steps": WARMUP, "weight_decay": 0.1, **changes})


def lora_model(**options) -> peftkit.PeftModel:
    torch.manual_seed(0)
    config = peftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **options)
    return peftkit.wrap(build_model(40, hidden=16), config)


def scheduled_lrs(schedule: str) -> list[float]:
    """The learning rate of each of TOTAL steps, as the run's scheduler sets it."""
    parameter = nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([parameter], lr=LR)
    scheduler = build_scheduler(optimizer, settings(lr_scheduler=schedule), TOTAL)
    lrs = []
    for _ in range(TOTAL):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def torch_reference_lrs(decay: str) -> list[float]:
    """Warm-up with torch's LinearLR, then torch's scheduler for the decay, run separately."""
    warm = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    warmup = torch.optim.lr_scheduler.LinearLR(
        warm, start_factor=1 / (WARMUP + 1), end_factor=1.0, total_iters=WARMUP
    )
    lrs = []
    for _ in range(WARMUP):
        lrs.append(warm.param_groups[0]["lr"])
        warm.step()
        warmup.step()
    rest = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    after = {
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(rest, T_max=TOTAL - WARMUP),
        "linear": lambda: torch.optim.lr_scheduler.LinearLR(
            rest, start_factor=1.0, end_factor=0.0, total_iters=TOTAL - WARMUP
        ),
        "constant": lambda: torch.optim.lr_scheduler.ConstantLR(rest, factor=1.0, total_iters=0),
    }[decay]()
    for _ in range(TOTAL - WARMUP):
        lrs.append(rest.param_groups[0]["lr"])
        rest.step()
        after.step()
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_each_schedule_is_the_warmup_then_torchs_own_scheduler(schedule: str) -> None:
    assert scheduled_lrs(schedule) == pytest.approx(torch_reference_lrs(schedule), rel=1e-9, abs=1e-15)


def test_schedules_by_hand() -> None:
    warmup = [LR * (s + 1) / (WARMUP + 1) for s in range(WARMUP)]  # 1/4, 2/4, 3/4 of lr
    decay = TOTAL - WARMUP
    assert scheduled_lrs("cosine") == pytest.approx(
        warmup + [LR * 0.5 * (1 + math.cos(math.pi * k / decay)) for k in range(decay)]
    )
    assert scheduled_lrs("linear") == pytest.approx(warmup + [LR * (1 - k / decay) for k in range(decay)])
    assert scheduled_lrs("constant") == pytest.approx(warmup + [LR] * decay)
    assert lr_factor(TOTAL + 5, WARMUP, TOTAL, "cosine") == lr_factor(TOTAL + 5, WARMUP, TOTAL, "linear") == 0


def test_adamw_decays_matrices_only() -> None:
    model = lora_model(use_dora=True)  # DoRA's magnitudes are one-dimensional
    optimizer = build_optimizer(model, settings())
    names = {id(p): n for n, p in model.named_parameters()}
    assert type(optimizer) is torch.optim.AdamW
    decayed, plain = optimizer.param_groups
    assert (decayed["lr"], decayed["weight_decay"], plain["lr"], plain["weight_decay"]) == (LR, 0.1, LR, 0.0)
    assert {names[id(p)] for p in decayed["params"]} == {
        n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2
    }
    assert {names[id(p)] for p in plain["params"]} == {
        n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 1
    }
    assert plain["params"] and all("magnitude" in names[id(p)] for p in plain["params"])


def test_lora_plus_gives_b_factors_lr_times_the_ratio() -> None:
    model = lora_model(use_dora=True)
    optimizer = build_optimizer(model, settings(optimizer="lora-plus", loraplus_lr_ratio=4))
    assert type(optimizer) is torch.optim.AdamW
    names = {id(p): n for n, p in model.named_parameters()}
    rate = {
        names[id(p)]: (group["lr"], group["weight_decay"])
        for group in optimizer.param_groups
        for p in group["params"]
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(rate) == trainable
    for name, param in model.named_parameters():
        if param.requires_grad:
            expected_lr = LR * 4 if "lora_B" in name else LR
            expected_decay = 0.1 if param.ndim == 2 else 0.0
            assert rate[name] == (expected_lr, expected_decay), name
    assert optimizer.param_groups[0]["lr"] == LR  # the base rate first: what metrics.jsonl logs


def test_lora_plus_learning_rates_follow_the_schedule() -> None:
    model = lora_model()
    config = settings(optimizer="lora-plus", loraplus_lr_ratio=4, lr_scheduler="linear")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, TOTAL)
    for _ in range(WARMUP + 2):
        optimizer.step()
        scheduler.step()
    factor = 1 - 2 / (TOTAL - WARMUP)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([LR * factor, 4 * LR * factor])


def old_inline_optimizer(model: nn.Module, lr: float, weight_decay: float, warmup: int, total: int):
    """What the training loop built before the seam (peftkit 5ba87af, training/loop.py), verbatim."""

    def old_lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=lr,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, old_lr_factor)


def test_the_default_is_the_old_adamw_and_cosine_bit_for_bit() -> None:
    config = load_config(None, {"weight_decay": 0.1})
    assert (config.optimizer, config.lr_scheduler) == ("adamw", "cosine")
    new_model, old_model = (lora_model(init_lora_weights=False, use_dora=True) for _ in range(2))
    new_optimizer = build_optimizer(new_model, config)
    new_scheduler = build_scheduler(new_optimizer, config, TOTAL)
    old_optimizer, old_scheduler = old_inline_optimizer(
        old_model, config.lr, config.weight_decay, config.warmup_steps, TOTAL
    )
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(TOTAL):
        for model, optimizer, scheduler in (
            (new_model, new_optimizer, new_scheduler),
            (old_model, old_optimizer, old_scheduler),
        ):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        assert new_scheduler.get_last_lr() == old_scheduler.get_last_lr()
    for (name, new), (_, old) in zip(new_model.named_parameters(), old_model.named_parameters(), strict=True):
        assert torch.equal(new, old), name


def test_lora_plus_is_refused_for_methods_without_b_factors() -> None:
    config = settings(optimizer="lora-plus", method="ia3")
    with pytest.raises(UsageError, match=r"optimizer lora-plus .* method 'ia3' has none"):
        check_optimizer(config, build_method_config("ia3", {}, "causal-lm"))
    with pytest.raises(UsageError, match="method 'full' has none"):
        check_optimizer(settings(optimizer="lora-plus", method="full"), None)
    check_optimizer(
        settings(optimizer="lora-plus", method="dora"), build_method_config("dora", {}, "causal-lm")
    )
    torch.manual_seed(0)
    embeddings_only = peftkit.wrap(
        build_model(40, hidden=16), peftkit.LoraConfig(r=2, target_modules=["embed_tokens"])
    )
    with pytest.raises(UsageError, match="optimizer lora-plus: the model has no trainable LoRA B factor"):
        build_optimizer(embeddings_only, settings(optimizer="lora-plus"))


def test_the_ratio_needs_lora_plus_and_is_at_least_one() -> None:
    with pytest.raises(UsageError, match=r"loraplus_lr_ratio .* applies to optimizer lora-plus, not 'adamw'"):
        settings(loraplus_lr_ratio=4)
    with pytest.raises(UsageError, match=r"loraplus_lr_ratio=0\.5 .* must be at least 1"):
        settings(optimizer="lora-plus", loraplus_lr_ratio=0.5)
    with pytest.raises(UsageError, match=r"lr_scheduler='cosin' .* must be one of .*did you mean 'cosine'"):
        settings(lr_scheduler="cosin")
