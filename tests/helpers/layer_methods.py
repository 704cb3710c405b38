"""Helpers shared by the tests of the layer methods (IA³, DoRA, PiSSA/OLoRA, bottleneck adapters)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from helpers.tiny_models import TinyModel, output_of


def perturb_trainable(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Add seeded noise to every trainable parameter, in name order (either library).

    Perturbing rather than overwriting keeps each method's parameters in their working range (IA³
    vectors near one, DoRA magnitudes near the weight norms) while making every tensor matter.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)


def perturb_adapters(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    """As :func:`perturb_trainable`, for the parameters of every adapter, trainable or not."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if ".adapters." in name:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)


@torch.no_grad()
def logits(model: nn.Module, tiny: TinyModel) -> Tensor:
    """The logits and, for transformers models, the last hidden state, flattened into one vector.

    The hidden state matters for BERT, whose tiny random classifier makes logits of size ~1e-2.
    """
    model.eval()
    if tiny.name == "mlp-conv":
        return output_of(model, tiny.inputs()).flatten()
    result = model(**tiny.inputs(), output_hidden_states=True)
    hidden = result.decoder_hidden_states if tiny.needs_decoder_ids else result.hidden_states
    return torch.cat([result.logits.flatten(), hidden[-1].flatten()])


def toy_causal_lm(seed: int = 0) -> nn.Module:
    """A tiny Llama whose weights have some scale (init std 0.1): multiplicative methods (IA³) can
    only rescale features the base already has, which the default std 0.02 makes near zero."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    return LlamaForCausalLM(config)


def train_toy_task(model: nn.Module, steps: int = 40, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """Fit a causal LM to four fixed sequences (memorisation: learnable by any method); the losses.

    Args:
        model: a wrapped tiny causal LM (vocabulary 64); only parameters with ``requires_grad`` train.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (4, 12), generator=generator)  # (batch, seq)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def changed(model: nn.Module, before: dict[str, Tensor]) -> set[str]:
    return {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}


def plain_name(name: str) -> str:
    """A PeftModel parameter name as the unwrapped base model names it."""
    return name.replace("model.", "", 1).replace(".base.", ".").replace(".original.", ".")


def rows(inputs: dict[str, Tensor], row: int) -> dict[str, Any]:
    return {key: value[row : row + 1] for key, value in inputs.items()}
