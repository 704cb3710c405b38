"""Selective fine-tuning (BitFit, norm tuning, names, blocks) on every tiny model, and LN tuning
against Hugging Face PEFT.

References: expected selections written out from parameter names with plain string tests, the
untouched base model (a deep copy taken before wrapping), and HF PEFT's LN tuning for files and
logits. fp32; parameter values compared exactly; outputs within atol 1e-5 of a separately run model (a
parameter that requires grad can take another kernel) and exactly when the same model runs again.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.core.layer import AdapterLayer, ModulesToSave

from helpers.model_level import randomize, toy_task_loss_falls
from helpers.tiny_models import TINY_MODELS, TinyModel, output_of, twin

ATOL = 1e-5
MODELS = {tiny.name: tiny for tiny in TINY_MODELS}


def expected_names(tiny: TinyModel, keep: object) -> set[str]:
    """Names of the base model's parameters for which ``keep(name)`` is true (tied tensors once)."""
    return {name for name, _ in tiny.make().named_parameters() if keep(name)}


SELECTIONS = [
    ("llama-norms", "llama", {"norms_only": True}, lambda n: "norm" in n),
    ("gpt2-bitfit", "gpt2", {"bias_only": True}, lambda n: n.endswith(".bias")),
    ("bert-norms", "bert", {"norms_only": True}, lambda n: "LayerNorm" in n),
    ("t5-norms", "t5", {"norms_only": True}, lambda n: "layer_norm" in n),
    ("llama-last-block", "llama", {"layers_to_transform": [1]}, lambda n: ".layers.1." in n),
    (
        "llama-block-norms-minus-final",
        "llama",
        {"norms_only": True, "exclude_modules": ["norm"]},
        lambda n: "layernorm" in n,
    ),
    (
        "llama-module-names",
        "llama",
        {"target_modules": ["q_proj", "lm_head"]},
        lambda n: "q_proj" in n or "lm_head" in n,
    ),
    (
        "t5-regex-blocks",
        "t5",
        {"target_modules": r".*\.(q|wo)\.weight", "layers_to_transform": 0},
        lambda n: ".block.0." in n and (n.endswith(".q.weight") or n.endswith(".wo.weight")),
    ),
    ("gpt2-tied-head", "gpt2", {"target_modules": ["lm_head"]}, lambda n: n == "transformer.wte.weight"),
    (
        "plain-names",
        "mlp-conv",
        {"target_modules": ["lin1", "head.bias"]},
        lambda n: n.startswith("lin1.") or n == "head.bias",
    ),
    (
        "bert-bitfit-layer0",
        "bert",
        {"bias_only": True, "layers_to_transform": [0]},
        lambda n: n.endswith(".bias") and ".layer.0." in n,
    ),
]


@pytest.mark.parametrize(("case", "model", "fields", "keep"), SELECTIONS, ids=[s[0] for s in SELECTIONS])
def test_selection_rules(case: str, model: str, fields: dict[str, object], keep: object) -> None:
    tiny = MODELS[model]
    wrapped = peftkit.wrap(tiny.make(), peftkit.SelectiveConfig(**fields))
    assert set(wrapped.model_adapters["default"].names) == expected_names(tiny, keep)


# (model, config fields) for the behaviour grid: one selection style per model.
GRID = {
    "mlp-conv": {"target_modules": ["lin2", "head"]},
    "llama": {"norms_only": True},
    "gpt2": {"bias_only": True},
    "bert": {"norms_only": True, "layers_to_transform": [1]},
    "t5": {"target_modules": ["o"], "layers_to_transform": [1]},
}


@pytest.fixture(params=list(GRID), ids=str)
def tiny(request: pytest.FixtureRequest) -> TinyModel:
    return MODELS[request.param]


def wrapped(tiny: TinyModel, randomize_values: bool = True) -> tuple[nn.Module, peftkit.PeftModel]:
    """(an untouched copy of the base, the wrapped model), the selected values randomized by default."""
    base = tiny.make()
    reference = twin(base)
    model = peftkit.wrap(base, peftkit.SelectiveConfig(**GRID[tiny.name]))
    if randomize_values:
        randomize(model, seed=0, scale=0.3)
    return reference, model


def selected(model: peftkit.PeftModel, name: str = "default") -> dict[str, torch.Tensor]:
    params = dict(model.model.named_parameters())
    return {n: params[n].detach().clone() for n in model.model_adapters[name].names}


def test_identity_at_init(tiny: TinyModel) -> None:
    reference, model = wrapped(tiny, randomize_values=False)
    inputs = tiny.inputs()
    torch.testing.assert_close(output_of(model, inputs), output_of(reference, inputs), atol=ATOL, rtol=0)


def test_only_selected_parameters_train_and_change(tiny: TinyModel) -> None:
    _, model = wrapped(tiny, randomize_values=False)
    chosen = {f"model.{name}" for name in model.model_adapters["default"].names}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == chosen
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    output_of(model, tiny.inputs()).float().pow(2).mean().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == chosen, (
        f"changed but not chosen: {changed - chosen}; chosen, unchanged: {chosen - changed}"
    )


def test_disable_restores_the_original_values_and_back(tiny: TinyModel) -> None:
    reference, model = wrapped(tiny)
    inputs = tiny.inputs()
    adapted = output_of(model, inputs)
    trained = selected(model)
    base_out = output_of(reference, inputs)
    assert not torch.allclose(adapted, base_out, atol=1e-4), "the adapter does not change the outputs"
    with model.disable_adapters():
        torch.testing.assert_close(output_of(model, inputs), base_out, atol=ATOL, rtol=0)
        originals = dict(reference.named_parameters())
        for name, value in selected(model).items():
            assert torch.equal(value, originals[name]), name
    torch.testing.assert_close(output_of(model, inputs), adapted, atol=0, rtol=0)
    for name, value in selected(model).items():
        assert torch.equal(value, trained[name]), name


def test_save_load_round_trip(tiny: TinyModel, tmp_path: Path) -> None:
    reference, model = wrapped(tiny)
    inputs = tiny.inputs()
    expected = output_of(model, inputs)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    names = model.model_adapters["default"].names
    if config["peft_type"] == "LN_TUNING":  # whole normalization layers: HF PEFT's format
        expected_keys = {
            f"base_model.model.{n.rsplit('.', 1)[0]}.ln_tuning_layers.{n.rsplit('.', 1)[1]}" for n in names
        }
    else:
        assert config["peft_type"] == "SELECTIVE"
        expected_keys = {f"base_model.model.{n}" for n in names}
    assert set(tensors) == expected_keys
    loaded = peftkit.load(reference, tmp_path)
    torch.testing.assert_close(output_of(loaded, inputs), expected, atol=0, rtol=0)
    assert loaded.trainable_parameters()[0] == 0, "a loaded adapter is frozen unless is_trainable=True"


def test_merge_and_unload_returns_the_plain_model_with_the_values(tiny: TinyModel) -> None:
    _, model = wrapped(tiny)
    inputs = tiny.inputs()
    expected = output_of(model, inputs)
    trained = selected(model)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave, peftkit.PeftModel)) for m in plain.modules())
    torch.testing.assert_close(output_of(plain, inputs), expected, atol=0, rtol=0)
    params = dict(plain.named_parameters())
    for name, value in trained.items():
        assert torch.equal(params[name], value), name


def test_unload_gives_the_original_values_back(tiny: TinyModel) -> None:
    reference, model = wrapped(tiny)
    plain = model.unload()
    inputs = tiny.inputs()
    torch.testing.assert_close(output_of(plain, inputs), output_of(reference, inputs), atol=ATOL, rtol=0)


def test_merge_adapter_is_a_no_op_that_is_recorded(tiny: TinyModel) -> None:
    _, model = wrapped(tiny)
    inputs = tiny.inputs()
    expected = output_of(model, inputs)
    model.merge_adapter()
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(output_of(model, inputs), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="unmerge"):
        model.set_adapter("default")
    model.unmerge_adapter()
    assert model.merged_adapters == []


def test_set_adapter_swaps_values_between_selective_adapters() -> None:
    tiny = MODELS["llama"]
    reference, model = wrapped(tiny)  # norms_only
    model.add_adapter("last", peftkit.SelectiveConfig(layers_to_transform=[1]))  # overlaps on layer 1 norms
    inputs = tiny.inputs()
    first = output_of(model, inputs)
    first_values = selected(model)
    model.set_adapter("last")
    originals = dict(reference.named_parameters())
    for name in first_values:
        if name not in model.model_adapters["last"].names:
            assert torch.equal(dict(model.model.named_parameters())[name], originals[name]), name
    torch.testing.assert_close(output_of(model, inputs), output_of(reference, inputs), atol=ATOL, rtol=0)
    randomize(model, seed=7, scale=0.1)  # trains "last" only
    second = output_of(model, inputs)
    model.set_adapter("default")
    torch.testing.assert_close(output_of(model, inputs), first, atol=0, rtol=0)
    for name, value in selected(model).items():
        assert torch.equal(value, first_values[name]), name
    model.set_adapter("last")
    torch.testing.assert_close(output_of(model, inputs), second, atol=0, rtol=0)
    model.delete_adapter("last")
    model.delete_adapter("default")
    torch.testing.assert_close(output_of(model, inputs), output_of(reference, inputs), atol=ATOL, rtol=0)


def test_two_model_level_adapters_cannot_be_active_together() -> None:
    tiny = MODELS["llama"]
    _, model = wrapped(tiny)
    model.add_adapter("other", peftkit.SelectiveConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="only one of them"):
        model.set_adapter(["default", "other"])


def test_selective_and_lora_compose_and_come_apart() -> None:
    tiny = MODELS["llama"]
    reference, model = wrapped(tiny)
    inputs = tiny.inputs()
    norms_only = output_of(model, inputs)
    model.add_adapter("lora", peftkit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.set_adapter(["default", "lora"])
    both = output_of(model, inputs)
    assert not torch.allclose(both, norms_only, atol=1e-4)
    with model.disable_adapters():
        torch.testing.assert_close(output_of(model, inputs), output_of(reference, inputs), atol=ATOL, rtol=0)
    model.delete_adapter("lora")
    torch.testing.assert_close(output_of(model, inputs), norms_only, atol=0, rtol=0)


def test_mixed_batches_are_refused() -> None:
    tiny = MODELS["gpt2"]
    _, model = wrapped(tiny)
    with pytest.raises(ValueError, match="layer adapters only"):
        model(**tiny.inputs(), adapter_names=["default", "__base__", "default"])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target_modules": "all-linear"}, "LoRA shorthand"),
    ],
)
def test_config_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        peftkit.SelectiveConfig(**fields)


def test_empty_selection_names_the_filters_and_shows_parameters() -> None:
    with pytest.raises(
        ValueError, match=r"\{'bias_only': True\} selects no parameter; the model has \['model\.embed"
    ):
        peftkit.wrap(MODELS["llama"].make(), peftkit.SelectiveConfig(bias_only=True))


@pytest.mark.parametrize(
    "fields", [{"norms_only": True}, {"target_modules": ["lm_head"]}], ids=["norms", "lm_head"]
)
def test_training_lowers_the_loss_on_a_toy_task(fields: dict[str, object]) -> None:
    first, last = toy_task_loss_falls(peftkit.SelectiveConfig(**fields))
    assert last < 0.5 * first, (first, last)


# ----------------------------------------------------------------------------- HF PEFT LN tuning oracle
peft = pytest.importorskip("peft")

LN_MODELS = ["llama", "gpt2", "bert", "t5"]
HF_LN_TARGETS = {"bert": ["LayerNorm"]}  # HF PEFT has no default LN targets for BERT


@pytest.fixture
def quiet() -> Iterator[None]:
    """HF PEFT warns about the tiny models' token ids; the oracle tests do not care."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@torch.no_grad()
def logits_and_hidden(model: nn.Module, tiny: TinyModel) -> torch.Tensor:
    result = model.eval()(**tiny.inputs(), output_hidden_states=True)
    hidden = result.decoder_hidden_states if tiny.needs_decoder_ids else result.hidden_states
    return torch.cat([result.logits.flatten(), hidden[-1].flatten()])


@pytest.mark.parametrize("name", LN_MODELS)
def test_hf_peft_loads_norms_only_as_ln_tuning(name: str, tmp_path: Path, quiet: None) -> None:
    tiny = MODELS[name]
    base = tiny.make()
    base_out = logits_and_hidden(twin(base), tiny)
    ours = peftkit.wrap(twin(base), peftkit.SelectiveConfig(norms_only=True))
    randomize(ours, seed=1, scale=0.5)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING"
    assert set(config) <= set(peft.LNTuningConfig().to_dict()) | {"peft_version"}, "fields HF PEFT lacks"

    theirs = peft.PeftModel.from_pretrained(twin(base), tmp_path)

    expected = logits_and_hidden(ours, tiny)
    assert (expected - base_out).abs().max() > 1e-3, "the adapter does not change the outputs"
    torch.testing.assert_close(logits_and_hidden(theirs, tiny), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", LN_MODELS)
def test_peftkit_loads_hf_peft_ln_tuning(name: str, tmp_path: Path, quiet: None) -> None:
    tiny = MODELS[name]
    base = tiny.make()
    base_out = logits_and_hidden(twin(base), tiny)
    theirs = peft.get_peft_model(twin(base), peft.LNTuningConfig(target_modules=HF_LN_TARGETS.get(name)))
    randomize(theirs, seed=2, scale=0.5)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.load(twin(base), tmp_path)

    assert isinstance(ours.peft_config["default"], peftkit.LNTuningConfig)
    expected = logits_and_hidden(theirs, tiny)
    assert (expected - base_out).abs().max() > 1e-3, "the adapter does not change the outputs"
    torch.testing.assert_close(logits_and_hidden(ours, tiny), expected, atol=ATOL, rtol=0)
    hf_keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    ours.save_pretrained(tmp_path / "again")
    assert set(load_file(str(tmp_path / "again" / "adapter_model.safetensors"))) == hf_keys
