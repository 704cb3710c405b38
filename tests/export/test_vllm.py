"""``peftkit inspect ADAPTER_DIR``: would vLLM serve it, and why not (vLLM's PEFTHelper checks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.cli import main
from peftkit.export.vllm import required_max_lora_rank, safetensors_names, vllm_command, vllm_problems

LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none"}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"r": 1024}, "above vLLM's largest --max-lora-rank, 512"),
        ({"rank_pattern": {"q_proj": 640}}, "rank 640"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "biases"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"peft_type": "IA3"}, "LoRA adapters only"),
    ],
)
def test_each_refusal_names_its_reason(change, reason) -> None:
    problems = vllm_problems({**LORA, **change}, ["base_model.model.q_proj.lora_A.weight"])
    assert len(problems) == 1 and reason in problems[0]


def test_plain_lora_passes_and_gets_its_max_lora_rank() -> None:
    assert vllm_problems({**LORA, "modules_to_save": ["score"], "init_lora_weights": "gaussian"}, []) == []
    assert [required_max_lora_rank({**LORA, "r": r}) for r in (1, 4, 8, 12, 300, 512)] == [
        1,
        8,
        8,
        16,
        320,
        512,
    ]
    assert vllm_command({**LORA, "r": 64, "base_model_name_or_path": "org/base"}, "json", "out/train") == (
        "vllm serve org/base --enable-lora --lora-modules json=out/train --max-lora-rank 64"
    )


def test_lora_on_embeddings_is_refused() -> None:
    names = ["base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.q_proj.lora_A.weight"]
    assert "embedding layers (base_model.model.model.embed_tokens)" in vllm_problems(LORA, names)[0]


def test_inspect_an_adapter_directory(serve_files: dict[str, Path], capsys) -> None:
    assert (
        len(safetensors_names(serve_files["alpha"] / "adapter_model.safetensors")) == 12
    )  # 3 targets x 2 layers x A, B
    assert main(["inspect", str(serve_files["alpha"])]) == 0
    out = capsys.readouterr().out
    assert "method LORA, rank 8" in out and "vLLM: would load it" in out
    assert f"--lora-modules alpha={serve_files['alpha']}" in out
