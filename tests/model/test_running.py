"""Running the adapted model: mixed batches (adapter_names, routings), generate, the forward signature.

References and tolerances: see helpers/model_cases.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import peftkit
from peftkit.core.layer import AdapterLayer

from helpers.model_cases import ATOL, grid, wrapped
from helpers.tiny_models import TINY_MODELS, TinyModel, output_of, randomize_adapters


@grid
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
    assert all(w.route is None for w in model.modules() if isinstance(w, AdapterLayer)), "routing leaked"


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
