"""wrap and load: what they refuse.

References and tolerances: see helpers/model_cases.py.
"""

from __future__ import annotations

import pytest

import peftkit

from helpers.tiny_models import TINY_MODELS

SECOND_WRAP_CONFIGS = {
    "lora": lambda: peftkit.LoraConfig(r=2, target_modules=["q_proj"]),
    "prompt": lambda: peftkit.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "selective": lambda: peftkit.SelectiveConfig(target_modules=["q_proj"]),
}


@pytest.mark.parametrize("method", SECOND_WRAP_CONFIGS)
def test_wrap_and_load_refuse_a_model_wrapped_already(method: str, tmp_path) -> None:
    base = TINY_MODELS[1].make()
    model = peftkit.wrap(base, SECOND_WRAP_CONFIGS[method]())
    model.save_pretrained(tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    with pytest.raises(TypeError, match=r"PeftModel already; call model\.add_adapter\(name, config\)"):
        peftkit.wrap(model, SECOND_WRAP_CONFIGS[method]())
    with pytest.raises(TypeError, match=r"PeftModel already; call model\.load_adapter\(path, adapter_name="):
        peftkit.load(model, tmp_path, adapter_name="second")
    # the base it wraps (changed in place) is refused too, whether its modules show it (LoRA) or not
    with pytest.raises(ValueError, match=r"holds peftkit adapters already.*model\.load_adapter\(path"):
        peftkit.load(base, tmp_path, adapter_name="second")
    with pytest.raises(ValueError, match=r"holds peftkit adapters already.*model\.add_adapter\(name"):
        peftkit.wrap(base, SECOND_WRAP_CONFIGS[method](), adapter_name="second")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable, "the first was touched"
    model.load_adapter(tmp_path, adapter_name="second")  # the way to add one
    model.set_adapter("second")
    model.set_adapter("default")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    plain = model.unload()  # an unloaded base is plain again
    assert isinstance(peftkit.load(plain, tmp_path), peftkit.PeftModel)


def test_a_base_holding_adapters_of_a_dropped_wrapper_is_refused(tmp_path) -> None:
    base = TINY_MODELS[1].make()
    peftkit.wrap(base, peftkit.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    # the PeftModel is gone; its layers stay in the base
    with pytest.raises(ValueError, match="holds peftkit adapters already"):
        peftkit.load(base, tmp_path)


def test_wrap_and_load_refuse_what_is_not_a_module(tmp_path) -> None:
    base = TINY_MODELS[1].make()
    with pytest.raises(
        TypeError, match=r"returns \(model, tokenizer\): write `base, tokenizer = load_model\(\)`"
    ):
        peftkit.wrap((base, object()), peftkit.LoraConfig(target_modules=["q_proj"]))
    peftkit.wrap(base, peftkit.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"needs a torch\.nn\.Module, got str"):
        peftkit.load("not a model", tmp_path)


# ----------------------------------------------------------------------------- forward's signature
