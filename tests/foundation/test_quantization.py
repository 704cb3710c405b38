"""Quantized bases (QLoRA) on bitsandbytes' CPU kernels: loading, LoRA/DoRA/IA3 on 4-bit and 8-bit
layers, gradient checkpointing, Hugging Face PEFT as the oracle both ways, and exact merges.

The model is tests/helpers/tiny_lm.py's 2-layer Llama at hidden size 128 (bitsandbytes quantizes in blocks
of 64, so the project's 32-wide tiny models are too narrow). Tolerances: logits of the same quantized
base and the same adapter tensors agree with Hugging Face PEFT's within 1e-5 (the same kernels run);
a merged, dequantized model agrees with the unmerged quantized one within 1e-2 on logits of size ~1
(the CPU 4-bit kernel computes in lower precision than the dequantized float32 matmul, measured ~3e-3).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.layer import AdapterLayer
from peftkit.foundation.errors import UsageError
from peftkit.foundation.loading import load_model
from peftkit.foundation.quantization import (
    SCHEMES,
    dequantize_weight,
    is_quantized,
    keep_trainable_layout,
    quantization_config,
)

pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[1, 5, 9, 13, 17, 21], [2, 4, 6, 8, 10, 12]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.tiny_lm import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny-lm-128"), hidden=128)


def quantized(model_dir: Path, scheme: str = "nf4"):
    model, _ = load_model(str(model_dir), quantize=scheme, quantization_options={"compute_dtype": "float32"})
    return model


def lora_on(model, **kwargs):
    torch.manual_seed(1)
    config = peftkit.LoraConfig(target_modules="all-linear", init_lora_weights=False, **kwargs)
    return peftkit.wrap(model, config)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_load_model_quantizes_the_linear_layers_but_not_the_head(model_dir, scheme) -> None:
    model = quantized(model_dir, scheme)
    layers = [name for name, m in model.named_modules() if is_quantized(m)]
    assert len(layers) == 2 * 7 and not any("lm_head" in name for name in layers)
    wrapped = lora_on(model)
    from transformers import AutoModelForCausalLM

    plain_total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    trainable, total = wrapped.trainable_parameters()  # 4-bit weights count as the weights they hold
    assert total - trainable == plain_total
    adapted = [name for name, m in wrapped.named_modules() if isinstance(m, AdapterLayer)]
    assert len(adapted) == 14 and not any("lm_head" in name for name in adapted)  # all-linear finds them


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_lora_trains_on_a_quantized_base_with_gradient_checkpointing(model_dir, scheme) -> None:
    model = lora_on(quantized(model_dir, scheme))
    model.train()
    model.gradient_checkpointing_enable()  # HF PEFT's most reported QLoRA error lived here
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_same_adapter_on_the_same_quantized_base_gives_hf_peft_logits_both_ways(model_dir, scheme, tmp_path):
    from peft import PeftModel as HfPeftModel

    ours = lora_on(quantized(model_dir, scheme), r=4, lora_alpha=8).eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs = HfPeftModel.from_pretrained(quantized(model_dir, scheme), tmp_path / "ours").eval()
    keep_trainable_layout(theirs)  # the same bitsandbytes kernel as peftkit's (no CPU inference repack)
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = peftkit.load(quantized(model_dir, scheme), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


def test_an_adapter_trained_on_4_bit_loads_on_the_unquantized_base(model_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    ours = lora_on(quantized(model_dir), r=4)
    ours.save_pretrained(tmp_path)
    plain = peftkit.load(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path)
    state = {k: v for k, v in plain.adapter_state_dict("default").items()}
    for key, value in ours.adapter_state_dict("default").items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merge_and_unload_returns_a_dequantized_model_with_the_adapter_merged(model_dir, method) -> None:
    torch.manual_seed(1)
    configs = {
        "lora": peftkit.LoraConfig(target_modules="all-linear", init_lora_weights=False),
        "dora": peftkit.LoraConfig(
            target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False
        ),
        "ia3": peftkit.IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
    }
    model = peftkit.wrap(quantized(model_dir), configs[method]).eval()
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
    with pytest.raises(
        ValueError, match=r"cannot merge into the 4-bit/8-bit weights .* merge_and_unload\(\)"
    ):
        model.merge_adapter()
    with torch.no_grad():  # a refused merge changed nothing
        torch.testing.assert_close(model(input_ids=IDS).logits, unmerged, atol=0, rtol=0)
    plain = model.merge_and_unload()
    assert not any(is_quantized(m) for m in plain.modules())
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert getattr(plain.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, unmerged, atol=1e-2, rtol=0)


def test_dequantized_weight_is_what_the_layer_computes_even_after_a_forward(model_dir) -> None:
    layer = quantized(model_dir).model.layers[0].self_attn.q_proj
    x = torch.randn(3, 128)
    with torch.no_grad():
        first = layer(x)  # bitsandbytes repacks the 4-bit weight for its CPU kernel here
        again = torch.nn.functional.linear(x, dequantize_weight(layer))
    torch.testing.assert_close(again, first, atol=1e-2, rtol=0)
    assert (again - first).abs().max() < 0.01 * first.abs().max()


def test_bad_quantization_input_is_one_clear_error(monkeypatch) -> None:
    with pytest.raises(UsageError, match="unknown quantization 'nf3'; use one of nf4, fp4, int8"):
        quantization_config("nf3")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name)
    )
    with pytest.raises(
        UsageError, match=r"need bitsandbytes, which is not installed: pip install 'peftkit\[qlora\]'"
    ):
        quantization_config("nf4")


def test_peftkit_train_quantize_nf4_trains_and_saves_a_plain_lora_file(model_dir, tmp_path) -> None:
    from peftkit.cli import main
    from peftkit.training.tasks import BUILTIN_TASKS

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(BUILTIN_TASKS["person-json"].train.read_text().splitlines()[:16]) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out)]
    argv += ["--quantize", "nf4", "--max-steps", "2", "--batch-size", "4", "--eval-examples", "0"]
    assert main(argv) == 0
    config = (out / "adapter_config.json").read_text()
    assert '"peft_type": "LORA"' in config and "quantiz" not in config  # an ordinary LoRA file
    assert "quantize: nf4" in (out / "train_config.yaml").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quantize", "nf3"], r"quantize='nf3' .* must be one of \['none', 'nf4', 'fp4', 'int8'\]"),
        (["--quantize", "nf4", "--method", "full"], "method 'full' trains base weights"),
        (["--quantize", "int8", "--method", "selective"], "method 'selective' trains base weights"),
    ],
)
def test_peftkit_train_bad_quantize_input_is_one_line_and_exit_2(model_dir, tmp_path, flags, message, capsys):
    from peftkit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--output-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_estimate_counts_quantized_weights_as_a_measured_step_holds_them(model_dir, scheme) -> None:
    # reference: measure_training_step on the loaded quantized model (parameters as stored, the
    # saved activations of a real step). Weights and activations within 3%; the peak within 10%, the
    # issue's target
    from peftkit.memory import estimate, measure_training_step

    lora = peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model, _ = load_model(str(model_dir), quantize=scheme, quantization_options={"compute_dtype": "float32"})
    model = peftkit.wrap(model, lora)
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (4, 64))
    measured = measure_training_step(
        model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    )
    predicted = estimate(str(model_dir), method=lora, batch=4, seq=64, quantize=scheme).peft
    assert abs(predicted.weights - measured.weights) <= 0.03 * measured.weights
    assert abs(predicted.activations - measured.activations) <= 0.03 * measured.activations
    assert abs(predicted.peak - measured.peak) <= 0.10 * measured.peak
    unquantized = estimate(str(model_dir), method=lora, batch=4, seq=64).peft
    assert predicted.weights < unquantized.weights * (0.35 if scheme == "nf4" else 0.5)


def test_trainer_with_gradient_checkpointing_trains_lora_on_a_4_bit_base(model_dir, tmp_path) -> None:
    # issue 14's item 4 on a quantized base: transformers' gradient_checkpointing=True through
    # peftkit.integrations.Trainer; the adapter changes, the 4-bit weights do not
    import datasets
    import transformers

    from peftkit.integrations import Trainer

    model, tokenizer = load_model(
        str(model_dir), quantize="nf4", quantization_options={"compute_dtype": "float32"}
    )
    model = peftkit.wrap(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {k: v.detach().clone() for k, v in model.adapter_state_dict("default").items()}
    packed = model.model.model.layers[0].self_attn.q_proj.base.weight.detach().clone()
    texts = ["Ada Park is a surgeon in Lima.", "Bo Li paints in Oslo.", "Cy Diaz flies to Pune."] * 2
    rows = datasets.Dataset.from_dict(dict(tokenizer(texts)))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        gradient_checkpointing=True,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    tokenizer.padding_side = "right"
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    losses = [entry["train_loss"] for entry in [trainer.train().metrics]]
    assert all(math.isfinite(loss) for loss in losses)
    after = model.adapter_state_dict("default")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model.model.model.layers[0].self_attn.q_proj.base.weight.detach(), packed)


def test_gradients_after_an_evaluation_are_those_of_a_fresh_model(model_dir) -> None:
    # bitsandbytes 0.50 repacks 4-bit weights for its CPU inference kernel on an eval-mode, no-grad
    # forward, and its backward then gave zero input gradients: a peftkit train run that scored the
    # base model first diverged. peftkit keeps the standard layout on the models it wraps.
    def lora_gradients(evaluate_first: bool) -> list[torch.Tensor]:
        model = lora_on(quantized(model_dir))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=IDS)
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    fresh, evaluated = lora_gradients(False), lora_gradients(True)
    assert all(g.abs().sum() > 0 for g in evaluated)
    for a, b in zip(fresh, evaluated, strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_the_quantization_options_peftkit_checks_are_bitsandbytesconfigs_arguments() -> None:
    import inspect

    from transformers import BitsAndBytesConfig

    from peftkit.foundation.quantization import BITSANDBYTES_CONFIG_FIELDS

    arguments = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    assert set(BITSANDBYTES_CONFIG_FIELDS) == arguments - {"load_in_4bit", "load_in_8bit"}


@pytest.mark.parametrize(
    ("option", "value"), [("bnb_4bit_use_double_quant", False), ("bnb_4bit_compute_dtype", torch.float32)]
)
def test_bitsandbytesconfigs_own_names_for_peftkits_two_options_are_accepted(option, value) -> None:
    assert getattr(quantization_config("nf4", **{option: value}), option) == value


def test_peftkit_train_quantize_options_reach_bitsandbytes_and_bad_ones_are_one_line(
    model_dir, tmp_path, capsys
) -> None:
    from peftkit.cli import main
    from peftkit.training.tasks import BUILTIN_TASKS

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(BUILTIN_TASKS["person-json"].train.read_text().splitlines()[:8]) + "\n")
    common = ["train", "--model", str(model_dir), "--data", str(data), "--eval-examples", "0"]
    common += ["--max-steps", "1", "--batch-size", "4", "--quantize", "nf4"]
    seen = []

    def record(step, loss, model):
        seen.append({type(m).__name__: m for m in model.modules()}["Linear4bit"])

    from peftkit.training import loop

    real_train = loop.train
    options = "{compute_dtype: float32, double_quant: false}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "train", lambda config, **kw: real_train(config, on_step=record, **kw))
        assert main([*common, "--output-dir", str(tmp_path / "run"), "--quantize-options", options]) == 0
    capsys.readouterr()
    layer = seen[0]
    assert layer.compute_dtype == torch.float32 and layer.weight.quant_state.nested is False
    assert "compute_dtype: float32" in (tmp_path / "run" / "train_config.yaml").read_text()

    for flags, message in [
        (
            ["--quantize-options", "{double_quantization: false}"],
            r"unknown quantization option 'double_quantization' \(did you mean 'double_quant'\?\)",
        ),
        (
            ["--quantize", "none", "--quantize-options", "{double_quant: false}"],
            "quantize_options .* apply to a quantized base",
        ),
    ]:
        assert main([*common, "--output-dir", str(tmp_path / "bad"), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
        assert not (tmp_path / "bad").exists()
