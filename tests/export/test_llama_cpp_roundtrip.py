"""GGUF files from ``peftkit export`` in llama.cpp itself: greedy continuations equal to PyTorch's.

For a tiny random model of every supported architecture (tests/helpers/tiny_families.py), in float32:
the base model's GGUF, the merged GGUF of a LoRA adapter (rsLoRA, ``rank_pattern`` and ``alpha_pattern``
all on, so per-layer scales differ from ``alpha / r``), and the LoRA GGUF on the base's GGUF: 20 argmax
tokens from llama.cpp equal to those of transformers (base) or of peftkit with the adapter, on three
prompts. The tiny models have sharp attention (large weights), so a wrong RoPE layout, norm or scale
changes the tokens (tested below by leaving one out).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.export import gguf_export
from peftkit.export.gguf_export import export
from peftkit.models import load_model

from helpers.llama_cpp_run import (
    PROMPTS,
    llama_greedy,
    llama_logits,
    open_llama,
    require_llama_cpp,
    torch_greedy,
)
from helpers.tiny_families import FAMILIES, save_family, save_random_lora

pytestmark = pytest.mark.usefixtures("one_thread")
LORA_OPTIONS = dict(use_rslora=True, rank_pattern={"k_proj": 4}, alpha_pattern={"o_proj": 3.0})


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda family: family.name)
def family_dirs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(request.param.name)
    model_dir = save_family(request.param, root / "model")
    return model_dir, save_random_lora(model_dir, root / "adapter", **LORA_OPTIONS)


def _prompt_ids(tokenizer) -> list[list[int]]:
    return [list(tokenizer(prompt)["input_ids"]) for prompt in PROMPTS]


def _assert_same_continuations(reference, tokenizer, gguf: Path, lora: Path | None = None) -> None:
    expected = [
        torch_greedy(reference, ids) for ids in _prompt_ids(tokenizer)
    ]  # PyTorch first, then llama.cpp
    llm = open_llama(gguf, lora)
    try:
        got = [llama_greedy(llm, ids) for ids in _prompt_ids(tokenizer)]
    finally:
        llm.close()
    assert got == expected


def test_base_model_gguf_continues_as_transformers(family_dirs, tmp_path) -> None:
    require_llama_cpp()
    model_dir, _ = family_dirs
    export(model_dir, tmp_path / "base.gguf", outtype="f32")
    model, tokenizer = load_model(str(model_dir))
    _assert_same_continuations(model, tokenizer, tmp_path / "base.gguf")


def test_merged_gguf_continues_as_peftkit_with_the_adapter(family_dirs, tmp_path) -> None:
    require_llama_cpp()
    model_dir, adapter_dir = family_dirs
    export(adapter_dir, tmp_path / "merged.gguf", outtype="f32")
    base, tokenizer = load_model(str(model_dir))
    _assert_same_continuations(peftkit.load(base, adapter_dir), tokenizer, tmp_path / "merged.gguf")


def test_lora_gguf_on_the_base_gguf_continues_as_peftkit_with_the_adapter(family_dirs, tmp_path) -> None:
    require_llama_cpp()
    model_dir, adapter_dir = family_dirs
    export(model_dir, tmp_path / "base.gguf", outtype="f32")
    export(adapter_dir, tmp_path / "adapter.gguf", format="gguf-lora", outtype="f32")
    base, tokenizer = load_model(str(model_dir))
    reference = peftkit.load(base, adapter_dir)
    _assert_same_continuations(reference, tokenizer, tmp_path / "base.gguf", tmp_path / "adapter.gguf")


def _family_dir(name: str, tmp_path: Path) -> tuple[Path, Path]:
    family = next(f for f in FAMILIES if f.name == name)
    model_dir = save_family(family, tmp_path / "model")
    return model_dir, save_random_lora(model_dir, tmp_path / "adapter", **LORA_OPTIONS)


def _architecture_change(**change):
    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        real = gguf_export.architecture_of
        monkeypatch.setattr(gguf_export, "architecture_of", lambda c: dataclasses.replace(real(c), **change))

    return patch


def _no_rope_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("peftkit.export.merged.llama3_rope_factors", lambda config: None)


@pytest.mark.parametrize(
    ("family", "leave_out"),
    [
        ("llama", _architecture_change(permute_qk=False)),  # Llama's q/k row order for llama.cpp's RoPE
        ("gemma2", _architecture_change(norm_shift=0.0)),  # Gemma's norms stored as 1 + w
        ("llama3", _no_rope_factors),  # Llama 3.1's RoPE scaling as a rope_freqs tensor
    ],
    ids=["permutation", "gemma-norms", "llama3-rope-freqs"],
)
def test_each_conversion_step_is_needed(family, leave_out, tmp_path, monkeypatch) -> None:
    """The round trips above can fail: without one of llama.cpp's conversion steps the logits move far."""
    require_llama_cpp()
    model_dir, _ = _family_dir(family, tmp_path)
    leave_out(monkeypatch)
    export(model_dir, tmp_path / "broken.gguf", outtype="f32")
    model, tokenizer = load_model(str(model_dir))
    ids = _prompt_ids(tokenizer)[0]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    llm = open_llama(tmp_path / "broken.gguf")
    try:
        assert (llama_logits(llm, ids) - expected).abs().max() > 1.0
    finally:
        llm.close()


def test_lora_scales_are_folded_into_b(tmp_path, monkeypatch) -> None:
    """Without folding rsLoRA / pattern scales into B, llama.cpp's alpha / r gives other tokens."""
    require_llama_cpp()
    model_dir, adapter_dir = _family_dir("llama", tmp_path)
    export(model_dir, tmp_path / "base.gguf", outtype="f32")
    monkeypatch.setattr("peftkit.export.lora.fold_scale", lambda B, scale, rank, alpha: B)
    export(adapter_dir, tmp_path / "adapter.gguf", format="gguf-lora", outtype="f32")
    base, tokenizer = load_model(str(model_dir))
    reference = peftkit.load(base, adapter_dir)
    with pytest.raises(AssertionError):
        _assert_same_continuations(reference, tokenizer, tmp_path / "base.gguf", tmp_path / "adapter.gguf")
