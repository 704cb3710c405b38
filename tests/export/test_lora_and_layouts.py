"""The maths of the conversion, against plain PyTorch: Llama's row permutation turns Hugging Face's
rotate-half RoPE into llama.cpp's pairwise one; folding a layer's scale into B keeps s·B·A under
llama.cpp's alpha / r; and what a LoRA GGUF cannot hold is refused, nothing written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.export.architectures import architecture_of, permute_rows
from peftkit.export.gguf_export import export
from peftkit.export.lora import fold_scale
from peftkit.foundation.errors import UsageError
from peftkit.models import load_model

from helpers.tiny_families import FAMILIES, save_family


def _rope_rotate_half(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Hugging Face's RoPE on one head, x: (d,), pairs (i, i + d/2)."""
    half = x.shape[0] // 2
    cos, sin = torch.cos(angles).repeat(2), torch.sin(angles).repeat(2)
    rotated = torch.cat([-x[half:], x[:half]])
    return x * cos + rotated * sin


def _rope_pairwise(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """llama.cpp's RoPE on one head, x: (d,), pairs (2i, 2i + 1)."""
    even, odd = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2] = even * torch.cos(angles) - odd * torch.sin(angles)
    out[1::2] = even * torch.sin(angles) + odd * torch.cos(angles)
    return out


def test_permuted_rows_under_pairwise_rope_give_hugging_faces_attention_scores() -> None:
    torch.manual_seed(0)
    heads, head_dim, hidden = 3, 8, 12
    Wq, Wk = torch.randn(heads * head_dim, hidden), torch.randn(heads * head_dim, hidden)
    x_q, x_k = torch.randn(hidden), torch.randn(hidden)
    angles_q = 5 * 1.0 / (10000 ** (torch.arange(0, head_dim, 2) / head_dim))  # position 5
    angles_k = 2 * 1.0 / (10000 ** (torch.arange(0, head_dim, 2) / head_dim))  # position 2
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        hf = _rope_rotate_half((Wq @ x_q)[rows], angles_q) @ _rope_rotate_half((Wk @ x_k)[rows], angles_k)
        q, k = (permute_rows(Wq, heads) @ x_q)[rows], (permute_rows(Wk, heads) @ x_k)[rows]
        assert torch.allclose(_rope_pairwise(q, angles_q) @ _rope_pairwise(k, angles_k), hf, atol=1e-4)
        unpermuted = _rope_pairwise((Wq @ x_q)[rows], angles_q) @ _rope_pairwise((Wk @ x_k)[rows], angles_k)
        assert not torch.allclose(unpermuted, hf, atol=1e-2)  # the check can fail


@pytest.mark.parametrize(
    ("scale", "rank", "alpha"),
    [(16 / 8, 8, 16.0), (16 / math.sqrt(8), 8, 16.0), (3.0 / 4, 4, 16.0), (0.5, 8, 0.0)],
    ids=["plain", "rslora", "patterns", "alpha-0"],
)
def test_folded_b_gives_the_layers_update_under_llama_cpps_scale(scale, rank, alpha) -> None:
    torch.manual_seed(0)
    A, B = torch.randn(rank, 6), torch.randn(5, rank)
    llama_cpp_scale = alpha / rank if alpha else 1.0  # llama.cpp: alpha / r, or 1 without an alpha
    assert torch.allclose(llama_cpp_scale * fold_scale(B, scale, rank, alpha) @ A, scale * B @ A, atol=1e-6)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_family(FAMILIES[0], tmp_path_factory.mktemp("llama") / "model")


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (lambda: peftkit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "DoRA"),
        (lambda: peftkit.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), "IA3"),
        (lambda: peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "PROMPT_TUNING"),
        (
            lambda: peftkit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
            "whole modules",
        ),
        (lambda: peftkit.LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only"), "biases"),
        (lambda: peftkit.LoraConfig(r=4, target_modules=["embed_tokens"]), "embeddings"),
    ],
    ids=["dora", "ia3", "prompt", "modules_to_save", "bias", "embedding"],
)
def test_what_a_lora_gguf_cannot_hold_is_refused_and_nothing_is_written(
    config, reason, llama_dir, tmp_path
) -> None:
    base, _ = load_model(str(llama_dir))
    peftkit.wrap(base, config()).save_pretrained(tmp_path / "adapter")
    with pytest.raises(UsageError, match=reason) as error:
        export(tmp_path / "adapter", tmp_path / "out" / "adapter.gguf", format="gguf-lora")
    assert "--format gguf" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_the_merged_export_takes_what_lora_cannot(llama_dir, tmp_path) -> None:
    base, _ = load_model(str(llama_dir))
    peftkit.wrap(base, peftkit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(
        tmp_path / "dora"
    )
    result = export(tmp_path / "dora", tmp_path / "dora.gguf", outtype="f32")
    assert result.files == [tmp_path / "dora.gguf"] and (tmp_path / "dora.gguf").stat().st_size > 0


def test_other_architectures_are_refused_naming_the_supported_list() -> None:
    from transformers import GPT2Config

    config = GPT2Config(architectures=["GPT2LMHeadModel"])
    with pytest.raises(
        UsageError, match="GPT2LMHeadModel is not exported to GGUF; supported: Llama"
    ) as error:
        architecture_of(config)
    assert "Gemma 3" in str(error.value) and "Phi-3" in str(error.value)


def test_a_gemma_config_llama_cpp_would_misread_is_refused(tmp_path) -> None:
    import gguf
    from transformers import Gemma2Config

    config = Gemma2Config(head_dim=16, query_pre_attn_scalar=20, architectures=["Gemma2ForCausalLM"])
    with pytest.raises(UsageError, match="query_pre_attn_scalar=20"):
        architecture_of(config).write_hparams(config, gguf.GGUFWriter(None, "gemma2"))
