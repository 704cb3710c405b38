"""Adapter files: save and load round trips, load_adapter_weights.

References and tolerances: see helpers/model_cases.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit

from helpers.model_cases import grid, wrapped
from helpers.tiny_models import TINY_MODELS, TinyModel, output_of, randomize_adapters


@grid
def test_save_load_round_trip(case: tuple[TinyModel, str], tmp_path) -> None:
    tiny, name = case
    reference, model = wrapped(tiny, name)
    inputs = tiny.inputs()
    expected = output_of(model, inputs)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peftkit.load(reference, tmp_path)
    torch.testing.assert_close(output_of(loaded, inputs), expected, atol=0, rtol=0)
    assert loaded.trainable_parameters()[0] == 0, "a loaded adapter is frozen unless is_trainable=True"


RELOADED_CONFIGS = {
    "lora-head": lambda: peftkit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]
    ),
    "ia3": lambda: peftkit.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
    "prompt": lambda: peftkit.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix": lambda: peftkit.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "norms": lambda: peftkit.SelectiveConfig(norms_only=True),
}


@pytest.mark.parametrize("method", list(RELOADED_CONFIGS))
def test_load_adapter_weights_replaces_values_in_place(method: str, tmp_path: Path) -> None:
    """The saved values come back exactly into the same parameter objects (an optimizer holding them
    stays valid); trainability and outputs are those of the saved model."""
    tiny = TINY_MODELS[1]
    model = peftkit.wrap(tiny.make(), RELOADED_CONFIGS[method]())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in trainable:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    inputs = tiny.inputs()
    expected = output_of(model, inputs)
    saved = {key: t.detach().clone() for key, t in model.adapter_state_dict("default").items()}
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in trainable:
                param.mul_(-1.5)
    params = dict(model.named_parameters())
    assert not torch.allclose(output_of(model, inputs), expected)

    model.load_adapter_weights(tmp_path)

    assert all(params[name] is p for name, p in model.named_parameters())
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    for key, tensor in model.adapter_state_dict("default").items():
        torch.testing.assert_close(tensor, saved[key], atol=0, rtol=0)
    torch.testing.assert_close(output_of(model, inputs), expected, atol=0, rtol=0)


def test_load_adapter_weights_refuses_another_config_and_changes_nothing(tmp_path: Path) -> None:
    tiny = TINY_MODELS[1]
    peftkit.wrap(
        tiny.make(), peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    ).save_pretrained(tmp_path)
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]))
    randomize_adapters(model)
    before = {key: t.detach().clone() for key, t in model.adapter_state_dict("default").items()}

    with pytest.raises(ValueError, match=r"another config.*lora_alpha: 8 in the file, 16 here"):
        model.load_adapter_weights(tmp_path)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['other'\]"):
        model.load_adapter_weights(tmp_path, "other")
    with pytest.raises(ValueError, match=r"exists already.*load_adapter_weights\(path, adapter_name\)"):
        model.load_adapter(tmp_path, "default")

    for key, tensor in model.adapter_state_dict("default").items():
        assert torch.equal(tensor, before[key])


def test_load_adapter_weights_refuses_a_table_an_encoder_computes(tmp_path: Path) -> None:
    """P-tuning saves its encoder's output: the file cannot restore the encoder that trains."""
    tiny = TINY_MODELS[1]
    model = peftkit.wrap(
        tiny.make(), peftkit.PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    )
    model.save_pretrained(tmp_path)

    with pytest.raises(ValueError, match="P-tuning's encoder output"):
        model.load_adapter_weights(tmp_path)
