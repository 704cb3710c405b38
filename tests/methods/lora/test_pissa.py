"""PiSSA / OLoRA: factors against independent decompositions (NumPy), the residual forward written out,
conversion to a plain rank-2r LoRA, Hugging Face PEFT as an oracle, a training run.

Tolerance: fp32, atol 1e-5 on outputs (summation order), 1e-4 on factor products of size ~1
compared across LAPACK implementations (NumPy vs torch).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.lora.pissa import PrincipalLoraLinear, olora_factors, pissa_factors

from helpers.layer_methods import logits, perturb_trainable, toy_causal_lm, train_toy_task
from helpers.tiny_models import TINY_MODELS, twin

ATOL = 1e-5
MODELS = {tiny.name: tiny for tiny in TINY_MODELS}


def seq(**modules: nn.Module) -> nn.Sequential:
    model = nn.Sequential()
    for name, module in modules.items():
        model.add_module(name, module)
    return model


def conv1d(nf: int, nx: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)  # weight (nx, nf) = (in, out)


@pytest.mark.parametrize(("out", "inp"), [(6, 10), (10, 6)])
def test_pissa_factors_are_the_principal_part(out: int, inp: int) -> None:
    torch.manual_seed(0)
    W = torch.randn(out, inp)
    A, B = pissa_factors(W, r=3, scaling=2.0)
    assert A.shape == (3, inp) and B.shape == (out, 3)
    U, S, Vh = np.linalg.svd(W.double().numpy(), full_matrices=False)
    principal = torch.from_numpy(U[:, :3] * S[:3] @ Vh[:3]).float()  # best rank-3 approximation
    torch.testing.assert_close(2.0 * B @ A, principal, atol=1e-4, rtol=0)
    # A's rows and B's columns are orthogonal, each carrying sqrt(S/s)
    torch.testing.assert_close(A @ A.T, torch.diag(torch.from_numpy(S[:3]).float() / 2.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(B.T @ B, torch.diag(torch.from_numpy(S[:3]).float() / 2.0), atol=1e-4, rtol=0)


def test_pissa_niter_approximates_the_principal_part() -> None:
    torch.manual_seed(0)
    W = torch.randn(12, 5) @ torch.diag(torch.tensor([9.0, 7.0, 5.0, 0.1, 0.05])) @ torch.randn(5, 16)
    A, B = pissa_factors(W, r=3, scaling=1.0, niter=4)
    U, S, Vh = np.linalg.svd(W.double().numpy(), full_matrices=False)
    torch.testing.assert_close(B @ A, torch.from_numpy(U[:, :3] * S[:3] @ Vh[:3]).float(), atol=1e-3, rtol=0)


def test_olora_factors_are_the_leading_qr_part() -> None:
    torch.manual_seed(0)
    W = torch.randn(10, 6)
    A, B = olora_factors(W, r=3)
    torch.testing.assert_close(B.T @ B, torch.eye(3), atol=1e-5, rtol=0)  # orthonormal columns
    assert torch.equal(A, torch.triu(A)), "A is the top of an upper-triangular R"
    Q, R = np.linalg.qr(W.double().numpy())  # (Q·D)(D·R) for any sign flips D: the product is unique
    torch.testing.assert_close(B @ A, torch.from_numpy(Q[:, :3] @ R[:3]).float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_forward_is_residual_plus_trained_factors(kind: str, init: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(10, 6) if kind == "linear" else conv1d(6, 10)
    W = layer.weight.detach().clone() if kind == "linear" else layer.weight.detach().T.clone()  # (out, in)
    b = layer.bias.detach().clone()
    config = peftkit.LoraConfig(r=3, lora_alpha=6, init_lora_weights=init, target_modules=["p"])
    model = peftkit.wrap(seq(p=layer), config)
    adapter = model.model.p.adapters["default"]
    assert isinstance(adapter, PrincipalLoraLinear)
    A0, B0 = adapter.lora_A.weight.detach().clone(), adapter.lora_B.weight.detach().clone()
    W_res = W - 2.0 * B0 @ A0
    x = torch.randn(2, 4, 10)
    torch.testing.assert_close(model(x), x @ W.T + b, atol=ATOL, rtol=0)  # identity at init
    with torch.no_grad():
        adapter.lora_A.weight.add_(torch.randn(3, 10) * 0.1)
        adapter.lora_B.weight.add_(torch.randn(6, 3) * 0.1)
    A, B = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
    expected = x @ (W_res + 2.0 * B @ A).T + b
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)
    model.merge_adapter()
    merged = model.model.p.base.weight.detach()
    torch.testing.assert_close(
        merged if kind == "linear" else merged.T, W_res + 2.0 * B @ A, atol=ATOL, rtol=0
    )


def test_only_a_and_b_train_and_the_base_is_untouched() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    weight = layer.weight.detach().clone()
    model = peftkit.wrap(
        seq(p=layer), peftkit.LoraConfig(r=2, init_lora_weights="pissa", target_modules=["p"])
    )
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "model.p.adapters.default.lora_A.weight",
        "model.p.adapters.default.lora_B.weight",
    }
    assert torch.equal(model.model.p.base.weight, weight), "the residual is computed, not written into W"
    assert set(model.adapter_state_dict("default")) == {
        "base_model.model.p.lora_A.weight",
        "base_model.model.p.lora_B.weight",
    }


@pytest.mark.parametrize(
    ("module", "kwargs", "message"),
    [
        (nn.Embedding(10, 4), {}, "supports floating-point nn.Linear and Conv1D layers, not Embedding"),
        (nn.Linear(8, 3), {"r": 4}, r"r=4 exceeds min\(in, out\)=3"),
    ],
)
def test_unsupported_modules_are_refused(module: nn.Module, kwargs: dict, message: str) -> None:
    config = peftkit.LoraConfig(init_lora_weights="pissa", target_modules=["p"], **{"r": 2, **kwargs})
    with pytest.raises(ValueError, match=message):
        peftkit.wrap(seq(p=module), config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_lora_weights": "pissa_niter_"}, "pissa_niter_<iterations>"),
        ({"init_lora_weights": "olora", "use_dora": True}, "use_dora=True with init_lora_weights='olora'"),
    ],
)
def test_bad_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        peftkit.LoraConfig(target_modules=["p"], **kwargs)


# ----------------------------------------------------------------------------- conversion
def trained_pissa(
    tiny_name: str, init: str = "pissa", **fields: object
) -> tuple[nn.Module, peftkit.PeftModel]:
    """(an untouched copy of the base, a PiSSA/OLoRA model whose factors moved away from their init)."""
    tiny = MODELS[tiny_name]
    base = tiny.make()
    reference = twin(base)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"], **fields}
    model = peftkit.wrap(base, peftkit.LoraConfig(init_lora_weights=init, **options))
    perturb_trainable(model, seed=1)
    return reference, model


@pytest.mark.parametrize(
    ("init", "fields"),
    [
        ("pissa", {}),
        ("olora", {}),
        ("pissa_niter_2", {}),
        ("pissa", {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}}),
    ],
    ids=["pissa", "olora", "pissa-niter", "pissa-rslora-patterns"],
)
def test_converted_lora_gives_the_same_model_on_the_original_base(
    init: str, fields: dict, tmp_path: Path
) -> None:
    reference, model = trained_pissa("llama", init, **fields)
    tiny = MODELS["llama"]
    expected = logits(model, tiny)
    assert (expected - logits(twin(reference), tiny)).abs().max() > 1e-3
    peftkit.convert_to_lora(model, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8
    factor = math.sqrt(2) if fields.get("use_rslora") else 2
    assert config["lora_alpha"] == pytest.approx(8 * factor)
    assert config["rank_pattern"] == {k: 2 * v for k, v in fields.get("rank_pattern", {}).items()}
    assert config["alpha_pattern"] == pytest.approx(
        {k: factor * v for k, v in fields.get("alpha_pattern", {}).items()}
    )
    loaded = peftkit.load(reference, tmp_path)
    assert not any(isinstance(m, PrincipalLoraLinear) for m in loaded.modules())
    torch.testing.assert_close(logits(loaded, tiny), expected, atol=ATOL, rtol=0)


def test_conversion_from_an_initial_directory(tmp_path: Path) -> None:
    tiny = MODELS["llama"]
    base = tiny.make()
    reference = twin(base)
    model = peftkit.wrap(base, peftkit.LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "initial")
    perturb_trainable(model, seed=1)
    peftkit.convert_to_lora(model, tmp_path / "converted", initial_dir=tmp_path / "initial")
    loaded = peftkit.load(reference, tmp_path / "converted")
    torch.testing.assert_close(logits(loaded, tiny), logits(model, tiny), atol=ATOL, rtol=0)


def test_conversion_errors(tmp_path: Path) -> None:
    tiny = MODELS["llama"]
    plain = peftkit.wrap(tiny.make(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="is not a PiSSA/OLoRA adapter"):
        peftkit.convert_to_lora(plain, tmp_path / "x")
    pissa = peftkit.wrap(
        tiny.make(), peftkit.LoraConfig(r=2, init_lora_weights="pissa", target_modules=["q_proj"])
    )
    other = peftkit.wrap(
        tiny.make(), peftkit.LoraConfig(r=3, init_lora_weights="pissa", target_modules=["q_proj"])
    )
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"has shape \(3, 32\) but the adapter's is \(2, 32\)"):
        peftkit.convert_to_lora(pissa, tmp_path / "y", initial_dir=tmp_path / "other")
    with pytest.raises(ValueError, match=r"has no adapter_config\.json"):
        peftkit.convert_to_lora(pissa, tmp_path / "y", initial_dir=tmp_path / "missing")
    assert not (tmp_path / "y").exists()


def test_training_lowers_the_loss() -> None:
    config = peftkit.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"]
    )
    model = peftkit.wrap(toy_causal_lm(), config)
    losses = train_toy_task(model, steps=40, lr=1e-2)
    assert losses[-1] < 0.85 * losses[0], losses


# ----------------------------------------------------------------------------- Hugging Face PEFT oracle
peft = pytest.importorskip("peft")

ORACLE = [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa")]  # HF's OLoRA mis-shapes Conv1D factors
TARGETS = {"llama": ["q_proj", "v_proj", "up_proj"], "gpt2": ["c_attn", "c_proj"]}


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # HF PEFT warns about Conv1D fan_in_fan_out and PiSSA, on purpose
        warnings.simplefilter("ignore")
        yield


def fields(model_name: str, init: str) -> dict:
    return {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[model_name], "init_lora_weights": init}


@pytest.mark.parametrize(("model_name", "init"), [*ORACLE, ("llama", "pissa_niter_2")])
def test_same_initial_factors_and_residual_as_hf_peft(model_name: str, init: str) -> None:
    """Same base, same seed: both libraries draw the same random numbers in the same order (niter SVD)."""
    tiny = MODELS[model_name]
    base = tiny.make()
    torch.manual_seed(5)
    ours = peftkit.wrap(twin(base), peftkit.LoraConfig(**fields(model_name, init)))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(twin(base), peft.LoraConfig(**fields(model_name, init)))
    hf_params = dict(theirs.named_parameters())
    compared = 0
    for path, module in ours.model.named_modules():
        if not isinstance(module, PrincipalLoraLinear):
            continue
        layer = path.removesuffix(".adapters.default")
        for name in ("lora_A", "lora_B"):
            hf = hf_params[f"base_model.model.{layer}.{name}.default.weight"]
            torch.testing.assert_close(getattr(module, name).weight, hf, atol=1e-5, rtol=0)
        initial = module.scaling * module.initial_B @ module.initial_A  # s·B₀·A₀, (out, in)
        weight = ours.model.get_submodule(layer).base.weight.detach()
        ours_residual = weight - (initial.T if module.transposed else initial)  # W_res, HF writes it into W
        hf_residual = hf_params[f"base_model.model.{layer}.base_layer.weight"].detach()
        torch.testing.assert_close(ours_residual, hf_residual, atol=1e-5, rtol=0)
        compared += 1
    assert compared == 6  # 2 blocks × 3 targeted layers (GPT-2: c_attn, attn.c_proj, mlp.c_proj)


@pytest.mark.parametrize(("model_name", "init"), ORACLE)
def test_hf_peft_loads_peftkit_pissa_file_on_the_original_base(
    model_name: str, init: str, tmp_path: Path
) -> None:
    """HF PEFT re-derives the residual from the base when loading, as peftkit does: same model."""
    tiny = MODELS[model_name]
    base = tiny.make()
    ours = peftkit.wrap(twin(base), peftkit.LoraConfig(**fields(model_name, init)))
    perturb_trainable(ours, seed=1)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(twin(base), tmp_path)
    expected = logits(ours, tiny)
    assert (expected - logits(twin(base), tiny)).abs().max() > 1e-3
    torch.testing.assert_close(logits(theirs, tiny), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("model_name", "init"), ORACLE)
def test_peftkit_loads_hf_peft_pissa_file_on_the_original_base(
    model_name: str, init: str, tmp_path: Path
) -> None:
    tiny = MODELS[model_name]
    base = tiny.make()
    theirs = peft.get_peft_model(twin(base), peft.LoraConfig(**fields(model_name, init)))
    perturb_trainable(theirs, seed=2)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load(twin(base), tmp_path)
    torch.testing.assert_close(logits(ours, tiny), logits(theirs, tiny), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("model_name", "init"), ORACLE)
def test_hf_peft_loads_converted_lora_on_the_original_base(
    model_name: str, init: str, tmp_path: Path
) -> None:
    """The brief's check: our converted adapter, in HF PEFT on the original base = our trained model."""
    tiny = MODELS[model_name]
    base = tiny.make()
    ours = peftkit.wrap(twin(base), peftkit.LoraConfig(**fields(model_name, init)))
    perturb_trainable(ours, seed=1)
    peftkit.convert_to_lora(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(twin(base), tmp_path)
    assert theirs.peft_config["default"].init_lora_weights is True and theirs.peft_config["default"].r == 8
    torch.testing.assert_close(logits(theirs, tiny), logits(ours, tiny), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("model_name", "init"), ORACLE)
def test_peftkit_loads_hf_peft_converted_lora(model_name: str, init: str, tmp_path: Path) -> None:
    """HF PEFT's own conversion (``path_initial_model_for_weight_conversion``) loads in peftkit."""
    tiny = MODELS[model_name]
    base = tiny.make()
    theirs = peft.get_peft_model(twin(base), peft.LoraConfig(**fields(model_name, init)))
    theirs.peft_config["default"].init_lora_weights = True  # HF's recipe: the initial copy must not re-init
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = init
    perturb_trainable(theirs, seed=2)
    theirs.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    ours = peftkit.load(twin(base), tmp_path / "converted")
    torch.testing.assert_close(logits(ours, tiny), logits(theirs, tiny), atol=ATOL, rtol=0)
