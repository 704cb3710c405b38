"""Re-quantizing a merged QLoRA model: an explicit choice, measured, and saved as a checkpoint that
transformers loads back quantized.

References are computed here without peftkit: the merged weight is the dequantized base weight plus
s·B·A from the adapter's own tensors, quantized with bitsandbytes' functions directly (the same codes;
the CPU kernel's bfloat16 block scales round by up to 2**-8 relative); the drift is recomputed from
logits taken before the merge. A saved and reloaded model gives the in-memory model's logits exactly
(same kernels, eval mode).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.foundation.errors import UsageError
from peftkit.foundation.loading import load_model
from peftkit.foundation.quantization import dequantize_weight, is_quantized
from peftkit.model.requantization import LayerQuantization, logit_drift

bnb = pytest.importorskip("bitsandbytes")

PROBE = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.tiny_lm import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny-lm-128-requantize"), hidden=128)


def lora_on_quantized(model_dir: Path, scheme: str = "nf4") -> peftkit.PeftModel:
    options = {} if scheme == "int8" else {"compute_dtype": "float32"}
    model, _ = load_model(str(model_dir), quantize=scheme, quantization_options=options)
    torch.manual_seed(1)
    config = peftkit.LoraConfig(target_modules="all-linear", init_lora_weights=False)
    return peftkit.wrap(model, config).eval()


def test_requantize_quantizes_the_merged_weight_as_bitsandbytes_does(model_dir) -> None:
    model = lora_on_quantized(model_dir)
    wrapper = model.model.model.layers[0].self_attn.q_proj
    lora = wrapper.adapters["default"]
    base_weight = dequantize_weight(wrapper.base)
    merged_weight = base_weight + lora.scaling * (lora.lora_B.weight @ lora.lora_A.weight)
    settings = LayerQuantization.of(wrapper.base)
    data, state = bnb.functional.quantize_4bit(
        merged_weight.contiguous(), blocksize=settings.blocksize, compress_statistics=True, quant_type="nf4"
    )
    expected = bnb.functional.dequantize_4bit(data, state).float()

    merged = model.merge_and_unload(requantize=True, probe=PROBE)

    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and LayerQuantization.of(layer) == settings
    # The CPU kernel keeps the block scales in bfloat16 after its first forward (the drift measurement):
    # relative rounding up to 2**-8.
    torch.testing.assert_close(dequantize_weight(layer), expected, atol=1e-6, rtol=2**-8)
    assert sum(is_quantized(m) for m in merged.modules()) == 2 * 7  # every layer that was quantized
    assert not is_quantized(merged.lm_head)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_the_reported_drift_is_the_change_of_the_logits_against_the_unmerged_model(model_dir, scheme) -> None:
    model = lora_on_quantized(model_dir, scheme)
    with torch.no_grad():
        unmerged = model(input_ids=PROBE).logits
    with torch.no_grad(), model.disable_adapters():
        base = model(input_ids=PROBE).logits
    merged = model.merge_and_unload(requantize=True, probe=PROBE).eval()
    for layer in merged.modules():  # the standard 4-bit CPU kernel, as under the PeftModel
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        after = merged(input_ids=PROBE).logits
    report = merged.requantization_report
    assert report.adapter_effect.mean_abs == pytest.approx((unmerged - base).abs().mean().item(), abs=1e-6)
    drift = report.drift
    difference = (after - unmerged).abs()
    assert drift.positions == PROBE.numel()
    assert drift.max_abs == pytest.approx(difference.max().item(), abs=1e-6)
    assert drift.mean_abs == pytest.approx(difference.mean().item(), abs=1e-6)
    agreement = (after.argmax(-1) == unmerged.argmax(-1)).float().mean().item()
    assert drift.top1_agreement == pytest.approx(agreement)
    assert drift.mean_abs > 0  # re-quantizing the merged weights changes them: that is the point


@pytest.mark.parametrize(
    ("base", "target", "kind"), [("nf4", True, "Linear4bit"), ("nf4", "int8", "Linear8bitLt")]
)
def test_a_requantized_model_saves_and_loads_back_quantized_with_equal_logits(
    model_dir, tmp_path, base, target, kind
) -> None:
    from transformers import AutoModelForCausalLM

    merged = lora_on_quantized(model_dir, base).merge_and_unload(requantize=target, probe=PROBE).eval()
    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(loaded.model.layers[1].mlp.down_proj).__name__ == kind
    assert loaded.config.quantization_config.load_in_8bit == (target == "int8")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=PROBE).logits, merged(input_ids=PROBE).logits, atol=0, rtol=0
        )


def test_requantize_is_refused_on_an_unquantized_base_and_for_an_unknown_scheme(model_dir) -> None:
    model, _ = load_model(str(model_dir))
    plain = peftkit.wrap(model, peftkit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(UsageError, match="the base model is not quantized; merge without it"):
        plain.merge_and_unload(requantize=True)
    quantized = lora_on_quantized(model_dir)
    with pytest.raises(UsageError, match="unknown scheme 'nf3'; use one of nf4, fp4, int8"):
        quantized.merge_and_unload(requantize="nf4".replace("4", "3"))
    assert is_quantized(quantized.model.model.layers[0].self_attn.q_proj.base)  # nothing changed


def test_logit_drift_statistics() -> None:
    reference = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    logits = torch.tensor([[[1.0, 0.5], [3.0, 2.0]]])  # the second position's top token flips
    drift = logit_drift(reference, logits)
    assert drift.max_abs == 3.0 and drift.mean_abs == pytest.approx(3.5 / 4)
    assert drift.relative == pytest.approx((3.5 / 4) / (3.0 / 4))
    assert drift.top1_agreement == 0.5 and drift.positions == 2
    with pytest.raises(ValueError, match="logit shapes differ"):
        logit_drift(reference, logits[:, :1])


def test_peftkit_merge_requantize_prints_the_drift_and_writes_a_quantized_model(
    model_dir, tmp_path, capsys
) -> None:
    from transformers import AutoModelForCausalLM

    from peftkit.cli import main
    from peftkit.training.tasks import BUILTIN_TASKS

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(BUILTIN_TASKS["person-json"].train.read_text().splitlines()[:8]) + "\n")
    run = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(run)]
    assert (
        main([*argv, "--quantize", "nf4", "--max-steps", "1", "--batch-size", "4", "--eval-examples", "0"])
        == 0
    )
    capsys.readouterr()
    assert main(["merge", str(run), str(tmp_path / "merged"), "--requantize"]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"re-quantized the merged layers; against the unmerged model, logits changed by [\d.e-]+ on average.*"
        r"the adapter itself changes the base model's logits by [\d.e-]+ on average",
        out,
    ), out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    # Without --requantize the merged model is plain (its tokenizer once carried the quantization config
    # into tokenizer_config.json and failed to save).
    assert main(["merge", str(run), str(tmp_path / "plain")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert "quantization" not in (tmp_path / "plain" / "tokenizer_config.json").read_text()

    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(run), str(tmp_path / "bad"), "--requantize", "nf3"])
    assert exit_info.value.code == 2
    assert "unknown scheme 'nf3'; use one of nf4, fp4, int8" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
