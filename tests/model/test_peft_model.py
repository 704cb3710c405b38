"""The PeftModel class on every tiny model: adapters added, switched, deleted, counted, pickled.

References and tolerances: see helpers/model_cases.py.
"""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
from torch import nn

import peftkit
from peftkit.core.layer import AdapterLayer, ModulesToSave

from helpers.model_cases import ATOL, grid, make_config, wrapped
from helpers.tiny_models import TINY_MODELS, TinyModel, output_of, randomize_adapters, twin


@grid
def test_identity_at_init(case: tuple[TinyModel, str]) -> None:
    tiny, name = case
    reference, model = wrapped(tiny, name, randomize=False)
    inputs = tiny.inputs()
    torch.testing.assert_close(output_of(model, inputs), output_of(reference, inputs), atol=ATOL, rtol=0)


@grid
def test_only_adapter_parameters_train(case: tuple[TinyModel, str]) -> None:
    tiny, name = case
    reference, model = wrapped(tiny, name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing is trainable"
    assert all(".adapters.default." in n or ".copies.default." in n for n in trainable), trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    output_of(model, tiny.inputs()).float().pow(2).mean().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the optimizer step changed nothing"
    assert changed <= trainable, f"frozen parameters changed: {changed - trainable}"
    frozen_now = {n: p for n, p in model.named_parameters() if n not in trainable}
    original = dict(reference.named_parameters())
    for n, p in frozen_now.items():
        plain = n.replace("model.", "", 1).replace(".base.", ".").replace(".original.", ".")
        if plain in original:
            assert torch.equal(p, original[plain]), n


@grid
def test_disable_adapters_gives_base_outputs(case: tuple[TinyModel, str]) -> None:
    tiny, name = case
    reference, model = wrapped(tiny, name)
    inputs = tiny.inputs()
    base_out = output_of(reference, inputs)
    adapted = output_of(model, inputs)
    assert not torch.allclose(adapted, base_out, atol=1e-4), "the adapter does not change the output"
    with model.disable_adapters():
        torch.testing.assert_close(output_of(model, inputs), base_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=0, rtol=0)
    model.merge_adapter()
    with model.disable_adapters():
        torch.testing.assert_close(output_of(model, inputs), base_out, atol=ATOL, rtol=0)
    assert model.merged_adapters == ["default"], "leaving the block merges back what was merged"


@grid
def test_delete_adapter_restores_original_modules(case: tuple[TinyModel, str]) -> None:
    tiny, name = case
    base = tiny.make()
    originals = {n: m for n, m in base.named_modules()}
    reference = twin(base)
    model = peftkit.wrap(base, make_config(tiny, name))
    model.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=[tiny.targets[0]]))
    randomize_adapters(model)
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"]
    assert model.active_adapters == ["other"]
    model.delete_adapter("other")
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in model.model.modules())
    for n, m in model.model.named_modules():
        assert m is originals[n], f"{n} is not the original module object"
    inputs = tiny.inputs()
    torch.testing.assert_close(output_of(model, inputs), output_of(reference, inputs), atol=ATOL, rtol=0)


@grid
def test_several_active_adapters_add_up(case: tuple[TinyModel, str]) -> None:
    """Two active adapters equal the base with both deltas merged into it (contributions summed)."""
    tiny, name = case
    _, model = wrapped(tiny, name, randomize=False)
    model.add_adapter("second", peftkit.LoraConfig(r=3, target_modules=list(tiny.targets)))
    randomize_adapters(model, seed=5)
    inputs = tiny.inputs()
    model.set_adapter(["default", "second"])
    both = output_of(model, inputs)
    model.set_adapter("default")
    only_first = output_of(model, inputs)
    assert not torch.allclose(both, only_first, atol=1e-4)
    model.merge_adapter(["default", "second"])
    torch.testing.assert_close(output_of(model, inputs), both, atol=ATOL, rtol=0)


def test_trainable_parameters_counts() -> None:
    """The lecture's arithmetic: LoRA r=8 on a 512x64 layer trains 4,608 parameters, not 32,768."""
    layer = nn.Sequential()
    layer.add_module("proj", nn.Linear(512, 64, bias=False))
    model = peftkit.wrap(layer, peftkit.LoraConfig(r=8, target_modules=["proj"]))
    trainable, total = model.trainable_parameters()
    assert trainable == 8 * 512 + 64 * 8 == 4_608
    assert total == 512 * 64 + 4_608
    assert 1 - trainable / (512 * 64) == pytest.approx(0.859, abs=1e-3)  # the lecture's "86% fewer"


def test_print_trainable_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    layer = nn.Sequential()
    layer.add_module("proj", nn.Linear(512, 64, bias=False))
    peftkit.wrap(layer, peftkit.LoraConfig(r=8, target_modules=["proj"])).print_trainable_parameters()
    assert capsys.readouterr().out == "trainable: 4,608 (4.61K) of 37,376 (37.38K) parameters (12.33%)\n"


def test_trainable_parameters_counts_tied_weights_once() -> None:
    tiny = TINY_MODELS[1]  # llama
    base = tiny.make()
    base.lm_head.weight = base.model.embed_tokens.weight
    unique = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    model = peftkit.wrap(base, peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    trainable, total = model.trainable_parameters()
    assert total == unique + trainable


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_train_biases(bias: str) -> None:
    tiny = TINY_MODELS[0]  # mlp-conv: every layer has a bias
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=2, target_modules=["lin1"], bias=bias))
    trainable_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    if bias == "lora_only":
        assert trainable_biases == {"model.lin1.base.bias"}
    else:
        expected = {f"model.{m}.bias" for m in ("emb", "conv1d", "conv2d", "lin2", "head")} - {
            "model.emb.bias"
        }
        assert trainable_biases == expected | {"model.lin1.base.bias"}
    keys = set(model.adapter_state_dict("default"))
    assert "base_model.model.lin1.base_layer.bias" in keys


def test_set_adapter_switches_trainability() -> None:
    tiny = TINY_MODELS[1]
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("b", peftkit.LoraConfig(r=2, target_modules=["v_proj"]))
    assert model.active_adapters == ["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    model.set_adapter("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)


@pytest.mark.parametrize(
    ("name", "message"),
    [("default", "exists already"), ("__base__", "reserved"), ("a.b", "without '.'"), ("", "non-empty")],
)
def test_bad_adapter_names(name: str, message: str) -> None:
    tiny = TINY_MODELS[1]
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=message):
        model.add_adapter(name, peftkit.LoraConfig(r=2, target_modules=["v_proj"]))


def test_unknown_adapter_names_are_errors() -> None:
    tiny = TINY_MODELS[1]
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    for call in (model.set_adapter, model.delete_adapter, lambda n: model.merge_adapter([n])):
        with pytest.raises(ValueError, match=r"unknown adapter.*\['default'\]"):
            call("missing")


def test_modules_to_save_that_matches_nothing() -> None:
    tiny = TINY_MODELS[1]
    with pytest.raises(ValueError, match="modules_to_save=\\['classifier'\\] matched no module"):
        peftkit.wrap(
            tiny.make(), peftkit.LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"])
        )


def test_config_reaches_base_model_attributes() -> None:
    tiny = TINY_MODELS[1]
    base = tiny.make()
    model = peftkit.wrap(base, peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.config is base.config
    assert model.get_base_model() is base


def test_seq_cls_task_trains_the_classifier_head() -> None:
    bert = TINY_MODELS[3]
    model = peftkit.wrap(bert.make(), peftkit.LoraConfig(target_modules="all-linear", task_type="SEQ_CLS"))
    assert isinstance(model.model.classifier, ModulesToSave)
    assert "model.bert.encoder.layer.0.attention.self.query.base.weight" in dict(model.named_parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.classifier.copies.default.weight", "model.classifier.copies.default.bias"} <= trainable
    assert not any(".classifier.original." in n or "classifier.base" in n for n in trainable)


def test_wrapped_layer_exposes_the_base_weight() -> None:
    model = peftkit.wrap(TINY_MODELS[4].make(), peftkit.LoraConfig(target_modules=["wo"]))
    layer = model.model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(layer, AdapterLayer) and layer.weight is layer.base.weight


def test_pickle_and_deepcopy_keep_the_wrapper_and_its_outputs() -> None:
    tiny = TINY_MODELS[1]
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=4, target_modules=list(tiny.targets)))
    randomize_adapters(model)
    inputs = tiny.inputs()
    expected = output_of(model, inputs)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)

    unpickled = torch.load(buffer, weights_only=False)  # the object this test just wrote
    copied = copy.deepcopy(model)

    for other in (unpickled, copied):
        assert type(other) is type(model)
        assert inspect.signature(other.forward) == inspect.signature(model.forward)
        assert other.active_adapters == ["default"]
        torch.testing.assert_close(output_of(other, inputs), expected, atol=0, rtol=0)


def test_a_copy_changes_its_own_adapters_only() -> None:
    tiny = TINY_MODELS[1]
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=4, target_modules=list(tiny.targets)))
    copied = copy.deepcopy(model)
    copied.merge_adapter()
    assert copied.merged_adapters == ["default"] and model.merged_adapters == []
    copied.unmerge_adapter()
    copied.delete_adapter("default")
    assert not any(isinstance(m, AdapterLayer) for m in copied.modules())
    assert list(model.peft_config) == ["default"]
    assert any(isinstance(m, AdapterLayer) for m in model.modules())


# ----------------------------------------------------------------------------- load_adapter_weights
