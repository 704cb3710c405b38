"""Running GGUF files in llama.cpp (llama-cpp-python) and the reference model in PyTorch (export tests).

Written apart from ``peftkit.export.verify`` so the round-trip tests do not check the exporter with its
own comparison code. llama-cpp-python is required in CI (``CI`` set: a missing install fails the tests);
on a developer's machine without it the tests that need it are skipped, saying why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

PROMPTS = (
    "Ada Park, 36, has worked as a surgeon in Toronto for ten years.",
    'Bo Li paints portraits in Lisbon. {"name": "Bo Li",',
    "The capital of France is",
)
NEW_TOKENS = 20


def require_llama_cpp() -> Any:
    """The ``llama_cpp`` module; skips the test where it is not installed, except in CI."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("llama-cpp-python is not installed: pip install 'peftkit[llamacpp]' (CI installs it)")
    return llama_cpp


def open_llama(path: Path, lora: Path | None = None, vocab_only: bool = False) -> Any:
    """A llama.cpp model with a float32 KV cache (so only the file's precision is compared)."""
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(
        model_path=str(path),
        lora_path=str(lora) if lora else None,
        n_ctx=256,
        logits_all=True,
        n_threads=1,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        vocab_only=vocab_only,
        verbose=False,
    )


def llama_greedy(llm: Any, ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """llama.cpp's argmax continuation of ``ids``."""
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if len(tokens) == new_tokens:
            return tokens
    return tokens


def llama_logits(llm: Any, ids: list[int]) -> torch.Tensor:
    """(len(ids), n_vocab) logits of llama.cpp at every position."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(llm.scores[: len(ids)].copy()).float()


def torch_greedy(model: Any, ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """The argmax continuation of ``ids`` (transformers' KV cache; end-of-sequence does not stop it)."""
    tokens: list[int] = []
    with torch.no_grad():
        output = model(torch.tensor([ids]), use_cache=True)
        for _ in range(new_tokens):
            tokens.append(int(output.logits[0, -1].argmax()))
            output = model(
                torch.tensor([tokens[-1:]]), past_key_values=output.past_key_values, use_cache=True
            )
    return tokens
