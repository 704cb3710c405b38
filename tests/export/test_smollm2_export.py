"""The real SmolLM2-135M-Instruct with a random LoRA adapter (rsLoRA, a rank and an alpha pattern) in
llama.cpp: the f32 merged GGUF and the f32 base GGUF with the LoRA GGUF continue as peftkit does, token
for token, on three prompts and a chat prompt; q8_0 is about 0.27x the f32 file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.export.gguf_export import export
from peftkit.models import load_model

from helpers.llama_cpp_run import PROMPTS, llama_greedy, open_llama, require_llama_cpp, torch_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory):
    """(adapter directory, the prompts' ids, peftkit's continuations of them with the adapter)."""
    base, tokenizer = load_model()
    torch.manual_seed(0)
    config = peftkit.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        init_lora_weights=False,
        use_rslora=True,
        rank_pattern={"k_proj": 4},
        alpha_pattern={"o_proj": 8.0},
    )
    model = peftkit.wrap(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)  # an update that changes the continuations
    adapter = tmp_path_factory.mktemp("smollm2") / "adapter"
    model.save_pretrained(adapter)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True
    )
    ids = [list(tokenizer(prompt)["input_ids"]) for prompt in (*PROMPTS, chat)]
    return adapter, ids, [torch_greedy(model, prompt) for prompt in ids]


def _continuations(gguf: Path, ids: list[list[int]], lora: Path | None = None) -> list[list[int]]:
    llm = open_llama(gguf, lora)
    try:
        return [llama_greedy(llm, prompt) for prompt in ids]
    finally:
        llm.close()


@pytest.fixture(scope="module")
def merged_f32(smollm2, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("merged") / "f32.gguf"
    export(smollm2[0], path, outtype="f32")
    return path


def test_f32_merged_gguf_continues_as_peftkit(smollm2, merged_f32) -> None:
    require_llama_cpp()
    _, ids, expected = smollm2
    assert _continuations(merged_f32, ids) == expected


def test_f32_lora_gguf_on_the_f32_base_continues_as_peftkit(smollm2, tmp_path) -> None:
    require_llama_cpp()
    adapter, ids, expected = smollm2
    export("smollm2-135m-instruct", tmp_path / "base.gguf", outtype="f32")
    export(adapter, tmp_path / "adapter.gguf", format="gguf-lora", outtype="f32")
    assert _continuations(tmp_path / "base.gguf", ids, tmp_path / "adapter.gguf") == expected


def test_q8_0_is_about_027x_the_f32_file(smollm2, merged_f32, tmp_path) -> None:
    export(smollm2[0], tmp_path / "q8_0.gguf", outtype="q8_0")
    ratio = (tmp_path / "q8_0.gguf").stat().st_size / merged_f32.stat().st_size
    assert 0.26 < ratio < 0.28
