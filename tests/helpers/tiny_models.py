"""Tiny models built from configs (random weights, CPU, seconds) and the checks the tests share on them."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

VOCAB = 64
BATCH = 3
SEQ = 7


class TinyConvMLP(nn.Module):
    """A plain PyTorch model with every layer type LoRA supports: Embedding, Conv1d, Conv2d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.conv1d = nn.Conv1d(16, 16, 3, padding=1)
        self.conv2d = nn.Conv2d(1, 4, 3, padding=1)
        self.lin1 = nn.Linear(16, 32)
        self.lin2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids: (batch, seq) → (batch, seq, 5)."""
        h = self.emb(input_ids)  # (batch, seq, 16)
        h = h + self.conv1d(h.transpose(1, 2)).transpose(1, 2)  # (batch, seq, 16)
        h = h + self.conv2d(h.unsqueeze(1)).mean(1)  # (batch, 4, seq, 16) → (batch, seq, 16)
        h = h + self.lin2(torch.relu(self.lin1(h)))
        return self.head(h)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB
    )
    return T5ForConditionalGeneration(config)


@dataclass(frozen=True)
class TinyModel:
    """A tiny model recipe: how to build it, feed it, and what LoRA targets in it."""

    name: str
    build: Callable[[], nn.Module]
    targets: tuple[str, ...]
    head: str
    needs_decoder_ids: bool = False

    def make(self, seed: int = 0) -> nn.Module:
        """A fresh model with seeded random weights, in eval mode."""
        torch.manual_seed(seed)
        return self.build().eval()

    def inputs(self, batch: int = BATCH, seed: int = 1) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, VOCAB, (batch, SEQ), generator=generator)
        inputs = {"input_ids": ids}
        if self.needs_decoder_ids:
            inputs["decoder_input_ids"] = torch.randint(1, VOCAB, (batch, 4), generator=generator)
        return inputs


TINY_MODELS = [
    TinyModel("mlp-conv", TinyConvMLP, ("emb", "conv1d", "conv2d", "lin1", "lin2"), head="head"),
    TinyModel("llama", _llama, ("q_proj", "v_proj"), head="lm_head"),
    TinyModel("gpt2", _gpt2, ("c_attn", "c_proj"), head="lm_head"),
    TinyModel("bert", _bert, ("query", "value"), head="classifier"),
    TinyModel("t5", _t5, ("q", "v"), head="lm_head", needs_decoder_ids=True),
]


def output_of(model: nn.Module, inputs: dict[str, Tensor], **kwargs: Any) -> Tensor:
    """The model's main output tensor (logits) for ``inputs``."""
    result = model(**inputs, **kwargs)
    return result if isinstance(result, Tensor) else result.logits


def randomize_adapters(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Give every adapter parameter of a PeftModel seeded random values, so adapters change outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def twin(model: nn.Module) -> nn.Module:
    """An independent copy of a base model, taken before wrapping changes it in place."""
    return copy.deepcopy(model)
