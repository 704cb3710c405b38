"""LoftQ: the factors against the truncated-SVD optimum computed here (float64), on random matrices and
on a real 4-bit base; the file is a plain LoRA that Hugging Face PEFT loads; bad input is one error.

Tolerances: peftkit's SVD runs in float32, the reference in float64; residual norms (size ~1–10) agree
within a relative 1e-4, products s·B·A within atol 1e-4. Logits against Hugging Face PEFT on the same
quantized base and tensors: atol 1e-5 (the same kernels run).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.layer import AdapterLayer
from peftkit.methods.lora.loftq import loftq_factors, replace_lora_weights_loftq

IDS = torch.tensor([[1, 5, 9, 13, 17, 21], [2, 4, 6, 8, 10, 12]])
RTOL = 1e-4


def svd_optimum(error: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    """The best rank-r approximation of ``error`` and the norm of what it leaves (float64)."""
    U, S, Vh = torch.linalg.svd(error.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r], S[r:].square().sum().sqrt().item()


@pytest.mark.parametrize(("out", "inp", "r", "scaling"), [(12, 20, 3, 2.0), (20, 12, 5, 0.5), (8, 8, 8, 1.0)])
def test_loftq_factors_leave_the_truncated_svd_optimum(out: int, inp: int, r: int, scaling: float) -> None:
    torch.manual_seed(0)
    W = torch.randn(out, inp)
    Q = torch.round(W * 4) / 4  # a coarse quantization of W
    A, B = loftq_factors(W, Q, r, scaling)
    assert A.shape == (r, inp) and B.shape == (out, r)
    best, left = svd_optimum(W - Q, r)
    torch.testing.assert_close((scaling * B @ A).double(), best, atol=1e-4, rtol=0)
    residual = torch.linalg.matrix_norm(W - (Q + scaling * B @ A)).item()
    assert residual == pytest.approx(left, rel=RTOL, abs=1e-6)
    assert residual < torch.linalg.matrix_norm(W - Q).item() or r == min(out, inp)


@pytest.mark.parametrize(
    ("weight", "quantized", "r", "message"),
    [
        ((4, 6), (6, 4), 2, r"two \(out, in\) weights of one shape; got \(4, 6\) and \(6, 4\)"),
        ((4, 6), (4, 6), 5, r"r=5 exceeds min\(out, in\)=4"),
    ],
)
def test_loftq_factors_bad_input_is_one_clear_error(weight, quantized, r, message) -> None:
    with pytest.raises(ValueError, match=message):
        loftq_factors(torch.zeros(weight), torch.zeros(quantized), r, 1.0)


# ----------------------------------------------------------------------------- on a 4-bit base
needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="quantized bases need bitsandbytes"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.tiny_lm import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny-lm-128"), hidden=128)  # 4-bit blocks are 64 wide


def quantized(model_dir: Path):
    from peftkit.foundation.loading import load_model

    model, _ = load_model(str(model_dir), quantize="nf4", quantization_options={"compute_dtype": "float32"})
    return model


def float_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def loftq_config(**kwargs) -> peftkit.LoraConfig:
    return peftkit.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="loftq", **kwargs
    )


@needs_bitsandbytes
def test_loftq_on_a_4_bit_base_leaves_the_svd_optimum_of_each_layer(model_dir) -> None:
    from peftkit.foundation.quantization import dequantize_weight

    model = peftkit.wrap(quantized(model_dir), loftq_config())  # W from model_dir, where it was loaded
    weights = float_weights(model_dir)
    layers = [(n, m) for n, m in model.model.named_modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    for name, layer in layers:
        W, Q = weights[f"{name}.weight"], dequantize_weight(layer.base)
        adapter = layer.adapters["default"]
        _, left = svd_optimum(W - Q, 4)
        residual = torch.linalg.matrix_norm(W - Q - adapter.delta_weight()).item()
        assert residual == pytest.approx(left, rel=RTOL), name
        assert residual < 0.99 * torch.linalg.matrix_norm(W - Q).item(), name
    # the returned report is the same measurement
    report = replace_lora_weights_loftq(model)
    name, layer = layers[0]
    W, Q = weights[f"{name}.weight"], dequantize_weight(layer.base)
    assert report[name][0] == pytest.approx(torch.linalg.matrix_norm(W - Q).item(), rel=RTOL)
    assert report[name][1] == pytest.approx(svd_optimum(W - Q, 4)[1], rel=RTOL)


@needs_bitsandbytes
def test_loftq_brings_the_outputs_closer_to_the_float_model(model_dir) -> None:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        exact = AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=IDS).logits
        plain = peftkit.wrap(quantized(model_dir), peftkit.LoraConfig(target_modules="all-linear")).eval()
        loftq = peftkit.wrap(quantized(model_dir), loftq_config()).eval()
        plain_gap = (plain(input_ids=IDS).logits - exact).norm().item()
        loftq_gap = (loftq(input_ids=IDS).logits - exact).norm().item()
    assert loftq_gap < plain_gap


@needs_bitsandbytes
def test_a_loftq_adapter_is_a_plain_lora_file_that_hf_peft_loads(model_dir, tmp_path) -> None:
    from peft import PeftModel as HfPeftModel

    from peftkit.foundation.quantization import keep_trainable_layout

    ours = peftkit.wrap(quantized(model_dir), loftq_config()).eval()
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True  # a loader must not initialise it again
    theirs = HfPeftModel.from_pretrained(quantized(model_dir), tmp_path).eval()
    keep_trainable_layout(theirs)  # the same bitsandbytes kernel as peftkit's
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    again = peftkit.load(quantized(model_dir), tmp_path).eval()  # peftkit reads the same factors back
    for key, value in ours.adapter_state_dict("default").items():
        torch.testing.assert_close(again.adapter_state_dict("default")[key], value, atol=0, rtol=0)


@needs_bitsandbytes
def test_loftq_on_an_unquantized_base_is_refused_and_leaves_the_model_unwrapped(model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"LoftQ initialisation needs a quantized base: adapter 'default'"):
        peftkit.wrap(model, loftq_config())
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


@needs_bitsandbytes
def test_loftq_without_the_float_weights_is_one_clear_error(model_dir, tmp_path) -> None:
    model = peftkit.wrap(quantized(model_dir), peftkit.LoraConfig(target_modules="all-linear"))
    with pytest.raises(ValueError, match=r"model_path='.*' holds none; pass model_path="):
        replace_lora_weights_loftq(model, model_path=tmp_path)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"unrelated.weight": torch.zeros(2, 2)}, other)
    missing = r"model.layers.0.self_attn.q_proj.weight is not in .*other.safetensors"
    with pytest.raises(ValueError, match=missing):
        replace_lora_weights_loftq(model, model_path=other)


def test_loftq_with_dora_is_refused() -> None:
    with pytest.raises(ValueError, match=r"init_lora_weights='loftq' with use_dora=True is not supported"):
        peftkit.LoraConfig(init_lora_weights="loftq", use_dora=True)


@needs_bitsandbytes
def test_peftkit_train_reaches_loftq_through_method_options(model_dir, tmp_path, capsys) -> None:
    from peftkit.cli import main
    from peftkit.training.tasks import BUILTIN_TASKS

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(BUILTIN_TASKS["person-json"].train.read_text().splitlines()[:16]) + "\n")
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--max-steps", "1", "--batch-size", "4"]
    argv += ["--eval-examples", "0", "--method-options", "{init_lora_weights: loftq}"]
    assert main([*argv, "--quantize", "nf4", "--output-dir", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["init_lora_weights"] is True
    assert "init_lora_weights: loftq" in (tmp_path / "run" / "train_config.yaml").read_text()
    assert main([*argv, "--output-dir", str(tmp_path / "float")]) == 2
    assert "LoftQ initialisation needs a quantized base" in capsys.readouterr().err
