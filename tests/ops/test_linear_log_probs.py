"""The chunked per-token log-probabilities against plain PyTorch.

The reference is ``log_softmax`` of whole float32 logits gathered at the targets, through autograd.
Tolerances: float32 1e-5 (the same products, summed in another order); bfloat16 inputs 2e-2 (one bf16
rounding of values of order 1).
"""

from __future__ import annotations

import pytest
import torch

from peftkit.ops import linear_log_probs, linear_log_probs_reference

N, HIDDEN, VOCAB = 29, 16, 50


def leaves(dtype: torch.dtype = torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, HIDDEN, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (N,), generator=generator)
    upstream = torch.randn(N, generator=generator)  # a different incoming gradient for every row
    return hidden, weight, targets, upstream


def plain(hidden, weight, targets):
    """Written out independently of the twin: log p = logit at the target − logsumexp of the logits."""
    logits = hidden.float() @ weight.float().T
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)


@pytest.mark.parametrize("chunk_elements", [VOCAB, 4 * VOCAB, 10**6])  # 1 row, 4 rows, all at once
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_equal_plain_log_softmax(chunk_elements: int, dtype: torch.dtype) -> None:
    hidden, weight, targets, upstream = leaves(dtype)
    expected = plain(hidden, weight, targets)
    (expected * upstream).sum().backward()
    expected_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    got = linear_log_probs(hidden, weight, targets, chunk_elements)
    (got * upstream).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == (N,) and got.dtype == torch.float32
    assert (got <= 0).all()
    torch.testing.assert_close(got, expected.detach(), atol=tol, rtol=0)
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    torch.testing.assert_close(hidden.grad.float(), expected_grads[0].float(), atol=tol, rtol=0)
    torch.testing.assert_close(weight.grad.float(), expected_grads[1].float(), atol=tol, rtol=0)


def test_twin_equals_the_written_out_formula() -> None:
    hidden, weight, targets, _ = leaves()
    torch.testing.assert_close(
        linear_log_probs_reference(hidden, weight, targets), plain(hidden, weight, targets), atol=1e-6, rtol=0
    )


def test_frozen_head_gets_no_gradient_and_no_grad_mode_gives_the_same_values() -> None:
    hidden, weight, targets, upstream = leaves()
    weight.requires_grad_(False)
    got = linear_log_probs(hidden, weight, targets, 4 * VOCAB)
    (got * upstream).sum().backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        again = linear_log_probs(hidden, weight, targets, 4 * VOCAB)
    assert not again.requires_grad
    torch.testing.assert_close(again, got.detach(), atol=0, rtol=0)


def test_only_the_head_trains() -> None:
    hidden, weight, targets, upstream = leaves()
    expected = plain(hidden.detach(), weight, targets)
    (expected * upstream).sum().backward()
    expected_grad = weight.grad.clone()
    weight.grad = None
    got = linear_log_probs(hidden.detach(), weight, targets, 4 * VOCAB)
    (got * upstream).sum().backward()
    torch.testing.assert_close(weight.grad, expected_grad, atol=1e-5, rtol=0)


def test_autocast_computes_in_float32() -> None:
    hidden, weight, targets, _ = leaves()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_log_probs(hidden, weight, targets)
    torch.testing.assert_close(got, plain(hidden, weight, targets).detach(), atol=1e-5, rtol=0)
