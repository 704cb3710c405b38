"""The fused output-head cross-entropy against plain PyTorch (its use as models' loss: tests/test_loss.py).

The reference is ``F.cross_entropy(reduction="sum")`` of whole float32 logits through autograd.
Tolerances: float32 atol 1e-5 relative to the loss's size (the same products summed in another order);
bfloat16 inputs 2e-2 (one bf16 rounding of values of order 1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit.ops import (
    fused_cross_entropy,
    fused_cross_entropy_enabled,
    linear_cross_entropy,
    plain_output_head,
)

from helpers.tiny_lm import build_model

N, HIDDEN, VOCAB = 37, 16, 50


def leaves(dtype: torch.dtype = torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, HIDDEN, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (N,), generator=generator)
    labels[::3] = -100  # a third of the rows are not scored
    return hidden, weight, labels


def plain(hidden, weight, labels):
    logits = hidden.float() @ weight.float().T
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk_elements", [VOCAB, 4 * VOCAB, 10**6])  # 1 row, 4 rows, everything at once
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradients_equal_plain_cross_entropy(chunk_elements: int, dtype: torch.dtype) -> None:
    hidden, weight, labels = leaves(dtype)
    expected = plain(hidden, weight, labels)
    (expected * 0.37).backward()  # an upstream gradient other than 1
    expected_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss, count = linear_cross_entropy(hidden, weight, labels, chunk_elements)
    (loss * 0.37).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert count.item() == (labels != -100).sum().item()
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, expected, rtol=tol, atol=tol)
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    assert torch.allclose(hidden.grad.float(), expected_grads[0].float(), atol=tol)
    assert torch.allclose(weight.grad.float(), expected_grads[1].float(), atol=tol)


def test_frozen_head_gets_no_gradient_and_no_grad_mode_matches() -> None:
    hidden, weight, labels = leaves()
    weight.requires_grad_(False)
    loss, _ = linear_cross_entropy(hidden, weight, labels, 4 * VOCAB)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        again, _ = linear_cross_entropy(hidden, weight, labels)
    assert torch.allclose(again, loss) and not again.requires_grad


def test_no_scored_row_gives_zero_loss_and_zero_gradients() -> None:
    hidden, weight, labels = leaves()
    loss, count = linear_cross_entropy(hidden, weight, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0
    assert not hidden.grad.any() and not weight.grad.any()


def test_switch_restores_the_setting() -> None:
    assert fused_cross_entropy_enabled()
    with fused_cross_entropy(False):
        assert not fused_cross_entropy_enabled()
    assert fused_cross_entropy_enabled()


def test_heads_the_fused_path_must_leave_alone() -> None:
    model = build_model(60)
    assert isinstance(plain_output_head(model), nn.Linear)
    model.config.final_logit_softcapping = 30.0
    assert plain_output_head(model) is None
    model.config.final_logit_softcapping = None
    model.lm_head.forward = model.lm_head.forward  # an instance-level forward, as accelerate's hooks set
    assert plain_output_head(model) is None
