"""The PeftModel API grid for the layer methods: (method × tiny model) cases.

References are independent of the code under test: the untouched base model (a deep copy taken
before wrapping), each row run alone, and the unmerged model. Tolerances: fp32, atol 1e-5 on outputs,
1e-5 on restored weights (IA³ unmerges by division, DoRA by division by its stored factor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import peftkit
from peftkit.core.adapter_config import AdapterConfig
from peftkit.core.layer import AdapterLayer, ModulesToSave

from helpers.layer_methods import (
    changed,
    logits,
    perturb_adapters,
    perturb_trainable,
    plain_name,
    snapshot,
    trainable_names,
)
from helpers.tiny_models import TINY_MODELS, TinyModel, output_of, twin

ATOL = 1e-5
MODELS = {tiny.name: tiny for tiny in TINY_MODELS}


@dataclass(frozen=True)
class Case:
    """One grid case: a method's config for a tiny model and what the method allows."""

    id: str
    model: str
    config: Callable[[], AdapterConfig]
    mergeable: bool = True
    #: a second adapter of the same method on the same layers (mixed batches, several active).
    second: Callable[[], AdapterConfig] | None = None

    @property
    def tiny(self) -> TinyModel:
        return MODELS[self.model]


IA3_TARGETS = {
    "mlp-conv": (["lin1", "lin2"], ["lin2"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "t5": (["k", "v", "wo"], ["wo"]),
}


def ia3(model: str, **kwargs: object) -> Callable[[], AdapterConfig]:
    targets, feedforward = IA3_TARGETS[model]
    return lambda: peftkit.IA3Config(target_modules=targets, feedforward_modules=feedforward, **kwargs)


LINEAR_TARGETS = {
    "mlp-conv": ["lin1", "lin2"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "value"],
    "t5": ["q", "v", "wo"],
}


def lora(model: str, **kwargs: object) -> Callable[[], AdapterConfig]:
    return lambda: peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR_TARGETS[model], **kwargs)


def bottleneck(model: str) -> Callable[[], AdapterConfig]:
    """Default placements (Houlsby) on transformers models; a named layer on the plain PyTorch one."""
    if model == "mlp-conv":
        return lambda: peftkit.BottleneckConfig(bottleneck_size=4, target_modules=["lin2"])
    return lambda: peftkit.BottleneckConfig(reduction_factor=4)


CASES = [
    *(Case(f"ia3-{name}", name, ia3(name), second=ia3(name)) for name in IA3_TARGETS),
    *(
        Case(f"dora-{name}", name, lora(name, use_dora=True), second=lora(name, use_dora=True))
        for name in LINEAR_TARGETS
    ),
    *(
        Case(f"pissa-{name}", name, lora(name, init_lora_weights="pissa"), second=lora(name))
        for name in LINEAR_TARGETS
    ),
    *(
        Case(
            f"olora-{name}",
            name,
            lora(name, init_lora_weights="olora"),
            second=lora(name, init_lora_weights="olora"),
        )
        for name in ("llama", "gpt2")
    ),
    *(
        Case(f"bottleneck-{name}", name, bottleneck(name), mergeable=False, second=bottleneck(name))
        for name in MODELS
    ),
]


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def wrapped(case: Case, perturb: bool = True) -> tuple[torch.nn.Module, peftkit.PeftModel]:
    """(an untouched copy of the base, the wrapped model), adapters perturbed away from init by default."""
    base = case.tiny.make()
    reference = twin(base)
    model = peftkit.wrap(base, case.config())
    if perturb:
        perturb_trainable(model, seed=1)
    return reference, model


def test_identity_at_init(case: Case) -> None:
    reference, model = wrapped(case, perturb=False)
    torch.testing.assert_close(logits(model, case.tiny), logits(reference, case.tiny), atol=ATOL, rtol=0)


def test_adapter_changes_the_output(case: Case) -> None:
    reference, model = wrapped(case)
    assert (logits(model, case.tiny) - logits(reference, case.tiny)).abs().max() > 1e-3


def test_only_its_parameters_train_and_change(case: Case) -> None:
    reference, model = wrapped(case)
    trainable = trainable_names(model)
    assert trainable and all(".adapters.default." in name for name in trainable), trainable
    before = snapshot(model)
    model.train()
    # Adam: every parameter with a nonzero gradient moves by ~lr, however small the gradient (BERT).
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    output_of(model, case.tiny.inputs()).pow(2).mean().backward()
    optimizer.step()
    moved = changed(model, before)
    assert moved, "the optimizer step changed nothing"
    assert moved <= trainable, f"frozen parameters changed: {moved - trainable}"
    original = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if name not in trainable and plain_name(name) in original:
            assert torch.equal(param, original[plain_name(name)]), name


def test_save_load_round_trip(case: Case, tmp_path) -> None:
    reference, model = wrapped(case)
    expected = logits(model, case.tiny)
    model.save_pretrained(tmp_path)
    loaded = peftkit.load(reference, tmp_path)
    saved_config = model.peft_config["default"].replace(inference_mode=True)  # as written to the file
    assert loaded.peft_config["default"].to_dict() == saved_config.to_dict()
    torch.testing.assert_close(logits(loaded, case.tiny), expected, atol=ATOL, rtol=0)
    assert loaded.trainable_parameters()[0] == 0


def test_merge_unmerge_or_clear_error(case: Case) -> None:
    _, model = wrapped(case)
    unmerged = logits(model, case.tiny)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    if not case.mergeable:
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            model.merge_adapter()
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            model.merge_and_unload()
        assert model.merged_adapters == []
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
        torch.testing.assert_close(logits(model, case.tiny), unmerged, atol=0, rtol=0)
        return
    model.merge_adapter()
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(logits(model, case.tiny), unmerged, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(logits(model, case.tiny), unmerged, atol=ATOL, rtol=0)


MERGEABLE = [case for case in CASES if case.mergeable]  # the others: test_merge_unmerge_or_clear_error


@pytest.mark.parametrize("case", MERGEABLE, ids=[case.id for case in MERGEABLE])
def test_merge_and_unload_returns_plain_model(case: Case) -> None:
    _, model = wrapped(case)
    expected = logits(model, case.tiny)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in plain.modules())
    torch.testing.assert_close(logits(plain, case.tiny), expected, atol=ATOL, rtol=0)


def test_disable_and_unload_give_the_base_back(case: Case) -> None:
    reference, model = wrapped(case)
    base_logits = logits(reference, case.tiny)
    with model.disable_adapters():
        torch.testing.assert_close(logits(model, case.tiny), base_logits, atol=ATOL, rtol=0)
    plain = model.unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in plain.modules())
    torch.testing.assert_close(logits(plain, case.tiny), base_logits, atol=ATOL, rtol=0)


def test_mixed_batch_equals_each_row_alone(case: Case) -> None:
    if case.second is None:
        pytest.skip("a second adapter of this method on the same layers is not meaningful")
    _, model = wrapped(case, perturb=False)
    model.add_adapter("second", case.second())
    perturb_adapters(model, seed=3)
    inputs = case.tiny.inputs(batch=3)
    names = ["second", "__base__", "default"]
    with torch.no_grad():
        mixed = output_of(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        row_inputs = {key: value[row : row + 1] for key, value in inputs.items()}
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapters():
                    alone = output_of(model, row_inputs)
            else:
                model.set_adapter(name)
                alone = output_of(model, row_inputs)
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=ATOL, rtol=0, msg=f"row {row}")


def test_delete_adapter_restores_original_modules(case: Case) -> None:
    base = case.tiny.make()
    originals = dict(base.named_modules())
    reference = twin(base)
    model = peftkit.wrap(base, case.config())
    perturb_trainable(model, seed=1)
    model.delete_adapter("default")
    for name, module in model.model.named_modules():
        assert module is originals[name], f"{name} is not the original module object"
    torch.testing.assert_close(logits(model, case.tiny), logits(reference, case.tiny), atol=ATOL, rtol=0)


HALF_PRECISION = {
    "ia3": ia3("llama"),
    "dora": lora("llama", use_dora=True),
    "pissa": lora("llama", init_lora_weights="pissa"),
    "bottleneck": bottleneck("llama"),
}


@pytest.mark.parametrize("method", list(HALF_PRECISION))
def test_bfloat16_base_gets_float32_adapters(method: str) -> None:
    """Adapters stay float32 on a bf16 base; outputs are bf16 and match the fp32 model within bf16 rounding.

    Tolerance: the values reach ~3, where one bf16 step is 1.6e-2 (the base model alone differs by that).
    """
    tiny = MODELS["llama"]
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = peftkit.wrap(tiny.make().to(dtype), HALF_PRECISION[method]())
        perturb_adapters(model, seed=1)
        models[dtype] = model
    assert {p.dtype for n, p in models[torch.bfloat16].named_parameters() if ".adapters." in n} == {
        torch.float32
    }
    half = logits(models[torch.bfloat16], tiny)
    assert half.dtype == torch.bfloat16
    full = logits(models[torch.float32], tiny)
    assert (full - logits(twin(tiny.make()), tiny)).abs().max() > 1e-2, "the adapter must matter"
    torch.testing.assert_close(half.float(), full, atol=5e-2, rtol=0)
