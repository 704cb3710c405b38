"""Checking an exported GGUF with llama.cpp itself (llama-cpp-python, ``pip install 'peftkit[llamacpp]'``).

For each prompt: the token ids of llama.cpp's tokenizer against the Hugging Face tokenizer's; the greedy
continuation of llama.cpp against the reference model's (peftkit's, a plain argmax loop on both sides,
end-of-sequence not stopping either, so both give ``new_tokens`` tokens); and, teacher-forced on the
prompt and the reference's continuation, how often the top tokens agree and the largest logit difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.foundation.errors import UsageError
from peftkit.foundation.formatting import format_table

__all__ = ["DEFAULT_PROMPTS", "VerifyReport", "VerifyRow", "llama_cpp_available", "verify_gguf"]

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Ada Park, 36, has worked as a surgeon in Toronto for ten years.",
    "def fibonacci(n):",
    "List three colours: red,",
)


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class VerifyRow:
    """One prompt's comparison.

    Attributes:
        prompt: the text.
        same_tokens: llama.cpp tokenized it to the Hugging Face tokenizer's ids.
        matching_tokens: how many of the greedy tokens agree before the first difference.
        new_tokens: how many were generated.
        top1_agreement: teacher-forced, the share of positions whose argmax agrees.
        max_logit_error: teacher-forced, max |llama.cpp logit − reference logit|.
    """

    prompt: str
    same_tokens: bool
    matching_tokens: int
    new_tokens: int
    top1_agreement: float
    max_logit_error: float


@dataclass(frozen=True)
class VerifyReport:
    """All prompts' rows, with a table and a verdict."""

    rows: tuple[VerifyRow, ...]

    @property
    def greedy_equal(self) -> bool:
        """Every prompt tokenized alike and every greedy continuation equal, token for token."""
        return all(row.same_tokens and row.matching_tokens == row.new_tokens for row in self.rows)

    def table(self) -> str:
        """A short table: one line per prompt."""
        headers = ["prompt", "token ids", "greedy tokens equal", "top-1 agreement", "max |Δ logit|"]
        lines = [
            [
                row.prompt if len(row.prompt) <= 32 else row.prompt[:29] + "...",
                "same" if row.same_tokens else "DIFFER",
                f"{row.matching_tokens}/{row.new_tokens}",
                f"{row.top1_agreement:.1%}",
                f"{row.max_logit_error:.2e}",
            ]
            for row in self.rows
        ]
        return format_table(lines, headers)


def verify_gguf(
    gguf_path: Path,
    reference: nn.Module,
    tokenizer: Any,
    lora_path: Path | None = None,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    new_tokens: int = 20,
) -> VerifyReport:
    """Compare llama.cpp running ``gguf_path`` (with the LoRA GGUF ``lora_path``) against ``reference``.

    The reference runs first, for all prompts, and llama.cpp after it, so the two never compete for the
    cores.

    Args:
        reference: the model the file should equal (the merged model, or the base with its adapter).
        tokenizer: the Hugging Face tokenizer of ``reference``.

    Raises:
        UsageError: llama-cpp-python is not installed, or llama.cpp could not load the file(s).
    """
    try:
        import llama_cpp
    except ImportError as e:
        raise UsageError("--verify needs llama-cpp-python: pip install 'peftkit[llamacpp]'") from e
    expected = [_reference(reference, list(tokenizer(p)["input_ids"]), new_tokens) for p in prompts]
    try:
        llm = llama_cpp.Llama(
            model_path=str(gguf_path),
            lora_path=str(lora_path) if lora_path else None,
            n_ctx=512,
            logits_all=True,
            n_threads=max(1, torch.get_num_threads()),
            type_k=llama_cpp.GGML_TYPE_F32,  # float32 KV cache: the file is checked, not the cache rounding
            type_v=llama_cpp.GGML_TYPE_F32,
            verbose=False,
        )
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"llama.cpp could not load {gguf_path}: {e}") from e
    try:
        return VerifyReport(tuple(_compare(llm, p, *e) for p, e in zip(prompts, expected, strict=True)))
    finally:
        llm.close()


def _reference(
    model: nn.Module, ids: list[int], new_tokens: int
) -> tuple[list[int], list[int], torch.Tensor]:
    """``(prompt ids, greedy continuation, logits over both)``: the reference's side, (T, vocab) logits."""
    continuation = _greedy(model, ids, new_tokens)
    with torch.no_grad():
        logits = model(torch.tensor([ids + continuation])).logits[0].float()
    return ids, continuation, logits


def _compare(llm: Any, prompt: str, ids: list[int], expected: list[int], logits: torch.Tensor) -> VerifyRow:
    llama_ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    got = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        got.append(token)
        if len(got) == len(expected):
            break
    matching = next((i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b), len(expected))
    sequence = ids + expected
    llm.reset()
    llm.eval(sequence)
    llama_logits = torch.from_numpy(llm.scores[: len(sequence)].copy()).float()  # (T, n_vocab)
    vocab = min(logits.shape[-1], llama_logits.shape[-1])
    logits, llama_logits = logits[:, :vocab], llama_logits[:, :vocab]
    agreement = (logits.argmax(-1) == llama_logits.argmax(-1)).float().mean().item()
    error = (logits - llama_logits).abs().max().item()
    return VerifyRow(prompt, llama_ids == ids, matching, len(expected), agreement, error)


def _greedy(model: nn.Module, ids: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` argmax tokens after ``ids`` (end-of-sequence does not stop it)."""
    tokens: list[int] = []
    with torch.no_grad():
        output = model(torch.tensor([ids]), use_cache=True)
        for _ in range(new_tokens):
            token = int(output.logits[0, -1].argmax())
            tokens.append(token)
            output = model(torch.tensor([[token]]), past_key_values=output.past_key_values, use_cache=True)
    return tokens
