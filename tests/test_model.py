"""The PeftModel API on every tiny model: a table of (model × LoRA config) cases.

References are independent of the code under test: the untouched base model (a deep copy taken before
wrapping), each row run alone, and the merged weights. Tolerances: fp32, atol 1e-5 on outputs,
1e-6 on restored weights.
"""

from __future__ import annotations

import copy
import inspect
import io
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit.layers import AdapterLayer, ModulesToSave

from conftest import TINY_MODELS, TinyModel, output_of, randomize_adapters, twin

ATOL = 1e-5

CONFIGS = {
    "plain": {"r": 4, "lora_alpha": 8},
    "rslora-dropout-patterns": {"r": 4, "lora_alpha": 16, "use_rslora": True, "lora_dropout": 0.1},
    "gaussian-head": {"r": 2, "init_lora_weights": "gaussian", "save_head": True},
}


def make_config(tiny: TinyModel, case: str) -> peftkit.LoraConfig:
    options = dict(CONFIGS[case])
    save_head = options.pop("save_head", False)
    if case == "rslora-dropout-patterns":
        options["rank_pattern"] = {tiny.targets[0]: 2}
        options["alpha_pattern"] = {tiny.targets[-1]: 4}
    return peftkit.LoraConfig(
        target_modules=list(tiny.targets), modules_to_save=[tiny.head] if save_head else None, **options
    )


GRID = [(tiny, case) for tiny in TINY_MODELS for case in CONFIGS]
GRID_IDS = [f"{tiny.name}-{case}" for tiny, case in GRID]


@pytest.fixture(params=GRID, ids=GRID_IDS)
def case(request: pytest.FixtureRequest) -> tuple[TinyModel, str]:
    return request.param


def wrapped(tiny: TinyModel, case: str, randomize: bool = True) -> tuple[nn.Module, peftkit.PeftModel]:
    """(an untouched copy of the base, the wrapped model) with random adapter values by default."""
    base = tiny.make()
    reference = twin(base)
    model = peftkit.wrap(base, make_config(tiny, case))
    if randomize:
        randomize_adapters(model)
    return reference, model


def test_identity_at_init(case: tuple[TinyModel, str]) -> None:
    tiny, name = case
    reference, model = wrapped(tiny, name, randomize=False)
    inputs = tiny.inputs()
    torch.testing.assert_close(output_of(model, inputs), output_of(reference, inputs), atol=ATOL, rtol=0)


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


def test_merge_matches_unmerged_and_unmerge_restores(case: tuple[TinyModel, str]) -> None:
    tiny, name = case
    _, model = wrapped(tiny, name)
    inputs = tiny.inputs()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    unmerged = output_of(model, inputs)
    model.merge_adapter()
    assert model.merged_adapters == ["default"]
    changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert changed, "merging changed no base weight"
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    assert model.merged_adapters == []
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(output_of(model, inputs), unmerged, atol=ATOL, rtol=0)


def test_merge_and_unload_returns_plain_model(case: tuple[TinyModel, str]) -> None:
    tiny, name = case
    _, model = wrapped(tiny, name)
    inputs = tiny.inputs()
    expected = output_of(model, inputs)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in plain.modules())
    assert not any(".adapters." in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(output_of(plain, inputs), expected, atol=ATOL, rtol=0)


def test_unload_gives_the_base_back(case: tuple[TinyModel, str]) -> None:
    tiny, name = case
    reference, model = wrapped(tiny, name)
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in plain.modules())
    inputs = tiny.inputs()
    torch.testing.assert_close(output_of(plain, inputs), output_of(reference, inputs), atol=ATOL, rtol=0)


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


def test_mixed_batch_equals_each_row_alone(case: tuple[TinyModel, str]) -> None:
    tiny, name = case
    _, model = wrapped(tiny, name, randomize=False)
    model.add_adapter("second", peftkit.LoraConfig(r=3, target_modules=list(tiny.targets)))
    randomize_adapters(model, seed=7)
    inputs = tiny.inputs(batch=3)
    names = ["second", "__base__", "default"]
    mixed = output_of(model, inputs, adapter_names=names)
    for row, adapter in enumerate(names):
        row_inputs = {k: v[row : row + 1] for k, v in inputs.items()}
        if adapter == "__base__":
            with model.disable_adapters():
                alone = output_of(model, row_inputs)
        else:
            model.set_adapter(adapter)
            alone = output_of(model, row_inputs)
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=ATOL, rtol=0)


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


def test_merge_in_bf16_goes_through_fp32() -> None:
    linear = nn.Sequential()
    linear.add_module("proj", nn.Linear(16, 8))
    linear = linear.to(torch.bfloat16)
    weight = linear.proj.weight.detach().float().clone()
    model = peftkit.wrap(linear, peftkit.LoraConfig(r=2, target_modules=["proj"]))
    randomize_adapters(model)
    adapter = model.model.proj.adapters["default"]
    delta = (adapter.lora_B.weight.float() @ adapter.lora_A.weight.float()) * adapter.scaling
    model.merge_adapter()
    expected = (weight + delta).to(torch.bfloat16)
    assert torch.equal(model.model.proj.base.weight, expected)


def test_safe_merge_refuses_non_finite_and_leaves_weights() -> None:
    tiny = TINY_MODELS[1]
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.model.model.layers[1].self_attn.v_proj.adapters["default"].lora_B.weight[0, 0] = float("nan")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    assert model.merged_adapters == []
    for n, p in model.named_parameters():
        if n in weights:  # restored by unmerging: equal up to float rounding
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0, msg=f"{n} was left changed")


def test_mixed_batch_refused_while_merged() -> None:
    tiny = TINY_MODELS[1]
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model(**tiny.inputs(), adapter_names=["default"] * 3)


def test_mixed_batch_wrong_length_and_unknown_name() -> None:
    tiny = TINY_MODELS[1]
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="one adapter name per row"):
        model(**tiny.inputs(batch=3), adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="unknown adapter"):
        model(**tiny.inputs(batch=3), adapter_names=["default", "nope", "__base__"])
    assert all(w.routing is None for w in model.modules() if isinstance(w, AdapterLayer)), "routing leaked"


def test_a_routing_made_once_gives_the_names_outputs_and_stacks_once() -> None:
    tiny = TINY_MODELS[1]
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", peftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, scale=0.5)
    names = ["b", "__base__", "default"]
    routing = model.routing(names)
    with torch.no_grad():
        for seed in range(2):  # two calls over different inputs reuse one routing
            inputs = tiny.inputs(batch=3, seed=seed)
            torch.testing.assert_close(
                output_of(model, inputs, adapter_names=routing), output_of(model, inputs, adapter_names=names)
            )
    assert routing.stacked and all(stack is not None for stack in routing.stacked.values())
    with pytest.raises(ValueError, match="unknown adapter"):
        model.routing(["nope"])


def test_mixed_batch_generate_equals_rows_alone() -> None:
    tiny = TINY_MODELS[1]
    model = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", peftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, scale=0.5)
    ids = tiny.inputs(batch=3)["input_ids"]
    names = ["b", "default", "__base__"]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kwargs)
    for row, name in enumerate(names):
        one = ids[row : row + 1]
        if name == "__base__":
            with model.disable_adapters():
                alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kwargs)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kwargs)
        assert torch.equal(mixed[row : row + 1], alone), f"row {row} ({name})"


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
@pytest.mark.parametrize("tiny", TINY_MODELS, ids=lambda tiny: tiny.name)
def test_forward_shows_the_base_models_parameters_and_adapter_names(tiny: TinyModel) -> None:
    """What transformers.Trainer reads: the instance's forward (dataset columns) and the class's
    (label names) list the base model's parameters, adapter_names added before **kwargs."""
    base = tiny.make()
    expected = [(p.name, p.kind) for p in inspect.signature(base.forward).parameters.values()]
    at = next((i for i, (_, kind) in enumerate(expected) if kind is inspect.Parameter.VAR_KEYWORD), None)
    expected.insert(len(expected) if at is None else at, ("adapter_names", inspect.Parameter.KEYWORD_ONLY))
    model = peftkit.wrap(base, peftkit.LoraConfig(r=2, target_modules=list(tiny.targets[:1])))
    another = peftkit.wrap(tiny.make(seed=1), peftkit.LoraConfig(r=2, target_modules=list(tiny.targets[:1])))

    shown = [(p.name, p.kind) for p in inspect.signature(model.forward).parameters.values()]
    on_class = [(p.name, p.kind) for p in inspect.signature(type(model).forward).parameters.values()]

    assert shown == expected
    assert on_class == [("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *expected]
    assert isinstance(model, peftkit.PeftModel) and type(model).__name__ == "PeftModel"
    assert type(another) is type(model), "one class per base-model class"


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


# ----------------------------------------------------------------------------- load_adapter_weights
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
