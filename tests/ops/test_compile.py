"""``torch.compile`` on a wrapped model (compiled after the adapters are added), against eager.

Inductor on CPU needs a C++ compiler and the Python headers; without them the tests skip and say so.
Tolerance: float32 atol 1e-5 (inductor fuses and reorders the same arithmetic).
"""

from __future__ import annotations

import os
import shutil
import sysconfig

import pytest
import torch
from torch import nn

import peftkit

ATOL = 1e-5


def missing_toolchain() -> str | None:
    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return "no C++ compiler on PATH (torch.compile's CPU backend, inductor, needs one)"
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "no Python.h (install the Python development headers for torch.compile on CPU)"
    return None


pytestmark = pytest.mark.skipif(missing_toolchain() is not None, reason=str(missing_toolchain()))


def randomize(model: peftkit.PeftModel) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_compiled_wrapped_mlp_equals_eager() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    model = peftkit.wrap(base, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    randomize(model)
    compiled = torch.compile(model)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    model.train()  # training step: the fast LoRA autograd function inside the compiled graph
    model(x).square().sum().backward()
    eager = gradients(model)
    compiled(x).square().sum().backward()
    traced = gradients(model)
    assert (
        set(traced)
        == set(eager)
        == {f"model.{i}.adapters.default.lora_{ab}.weight" for i in (0, 2) for ab in "AB"}
    )
    for name, grad in traced.items():
        torch.testing.assert_close(grad, eager[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.slow
def test_compiled_wrapped_llama_equals_eager() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    model = peftkit.wrap(
        LlamaForCausalLM(config).eval(), peftkit.LoraConfig(r=4, target_modules="all-linear")
    )
    randomize(model)
    compiled = torch.compile(model)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(input_ids=ids).logits, model(input_ids=ids).logits, atol=ATOL, rtol=0
        )
    model.train()
    eager_loss = model(input_ids=ids, labels=ids).loss
    eager_loss.backward()
    eager = gradients(model)
    compiled_loss = compiled(input_ids=ids, labels=ids).loss
    compiled_loss.backward()
    traced = gradients(model)
    torch.testing.assert_close(compiled_loss, eager_loss, atol=ATOL, rtol=0)
    assert set(traced) == set(eager) and len(eager) == 2 * 7 * 2
    for name, grad in traced.items():
        torch.testing.assert_close(grad, eager[name], atol=ATOL, rtol=0, msg=name)
