"""The file itself, read back with gguf's reader: tensor types as llama.cpp's converter picks them, values
equal to the model's (f32 exactly, f16 as torch rounds them), metadata keys, and a merge into the float
base for runs trained on a 4-bit one."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import peftkit
from peftkit.export.architectures import permute_rows
from peftkit.export.gguf_export import export
from peftkit.export.gguf_file import tensor_type
from peftkit.models import load_model
from peftkit.training.train_config import TrainConfig

from helpers.tiny_families import FAMILIES, save_family

Q = gguf.GGMLQuantizationType


def test_tensor_types_follow_llama_cpps_converter() -> None:
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q8_0") == Q.F32  # norms and 1-D stay float32
    assert tensor_type("blk.0.attn_q.bias", (64,), "f16") == Q.F32
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "q8_0") == Q.Q8_0
    assert tensor_type("blk.0.attn_q.weight.lora_b", (64, 8), "q8_0") == Q.F16  # rows of 8: no Q8_0 block
    assert tensor_type("token_embd.weight", (100, 64), "bf16") == Q.BF16


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory):
    return save_family(FAMILIES[0], tmp_path_factory.mktemp("llama") / "model")


def _tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize(("outtype", "dtype"), [("f32", torch.float32), ("f16", torch.float16)])
def test_values_are_the_models_in_llama_cpps_layout(outtype, dtype, llama_dir, tmp_path) -> None:
    export(llama_dir, tmp_path / "model.gguf", outtype=outtype)
    tensors = _tensors(tmp_path / "model.gguf")
    weights = load_file(llama_dir / "model.safetensors")
    expected = {
        "blk.1.ffn_down.weight": weights["model.layers.1.mlp.down_proj.weight"],
        "blk.0.attn_q.weight": permute_rows(weights["model.layers.0.self_attn.q_proj.weight"], 4),
        "blk.0.attn_k.weight": permute_rows(weights["model.layers.0.self_attn.k_proj.weight"], 2),
        "token_embd.weight": weights["model.embed_tokens.weight"],
    }
    for name, value in expected.items():
        got = torch.from_numpy(np.array(tensors[name].data)).reshape(value.shape)
        assert torch.equal(got, value.to(dtype)), name
    assert tensors["output_norm.weight"].tensor_type == Q.F32
    assert "output.weight" not in tensors  # tied: llama.cpp reuses the token embedding


def test_q8_0_is_about_a_quarter_of_f32(llama_dir, tmp_path) -> None:
    for outtype in ("f32", "q8_0"):
        export(llama_dir, tmp_path / f"{outtype}.gguf", outtype=outtype)
    ratio = (tmp_path / "q8_0.gguf").stat().st_size / (tmp_path / "f32.gguf").stat().st_size
    assert (
        0.25 < ratio < 0.40
    )  # 34 bytes per 32 weights; the tiny model's metadata weighs more (SmolLM2: 0.27)


def test_metadata_is_what_llama_cpp_reads(llama_dir, tmp_path) -> None:
    export(llama_dir, tmp_path / "model.gguf", outtype="f16")
    fields = gguf.GGUFReader(tmp_path / "model.gguf").fields
    value = {name: field.contents() for name, field in fields.items()}
    assert value["general.architecture"] == "llama" and value["general.type"] == "model"
    assert value["llama.block_count"] == 2 and value["llama.attention.head_count_kv"] == 2
    assert (
        value["llama.rope.dimension_count"] == 16
        and value["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    )
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    assert value["tokenizer.chat_template"].startswith("{% for message in messages %}")


def test_a_run_trained_on_a_4bit_base_merges_into_the_float_base(llama_dir, tmp_path) -> None:
    base, _ = load_model(str(llama_dir))
    torch.manual_seed(1)
    run = tmp_path / "run"
    config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], init_lora_weights=False)
    peftkit.wrap(base, config).save_pretrained(run)
    settings = TrainConfig(model=str(llama_dir), quantize="nf4", output_dir=str(run), data="person-json")
    (run / "train_config.yaml").write_text(yaml.safe_dump(settings.to_dict(), sort_keys=False))
    result = export(run, tmp_path / "merged.gguf", outtype="f32")
    assert any("nf4" in note and "float base" in note for note in result.notes)
    adapter = load_file(run / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.v_proj"
    W = load_file(llama_dir / "model.safetensors")["model.layers.0.self_attn.v_proj.weight"]
    expected = W + 2.0 * adapter[f"{key}.lora_B.weight"] @ adapter[f"{key}.lora_A.weight"]  # s = 8 / 4
    got = torch.from_numpy(np.array(_tensors(tmp_path / "merged.gguf")["blk.0.attn_v.weight"].data))
    assert torch.allclose(got.reshape(expected.shape), expected, atol=1e-6)
