"""Memory estimate against measurement, and the estimate's own arithmetic.

The reference for every estimate is :func:`peftkit.memory.measure_training_step` on the same model
(a different mechanism: saved-tensor hooks and live-tensor tracking of a real step), or, for the 70B
config, parameter counts written out here from the Llama architecture.
Tolerance: 15% (the issue's bar) on every component and on the peak.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import peftkit
from peftkit.memory import (
    estimate,
    format_estimate,
    measure_training_step,
)
from peftkit.methods.lora import adapters as lora_adapters
from peftkit.ops import fast_lora
from peftkit.ops.dropout import POSITIONS_UP_TO

from helpers.tiny_lm import llama_70b_config, tiny_llama_config

TOLERANCE = 0.15
COMPONENTS = ("weights", "gradients", "optimizer_states", "activations", "peak")


def assert_close(estimated: int, measured: int, what: str) -> None:
    error = abs(estimated - measured) / measured
    assert error <= TOLERANCE, f"{what}: estimated {estimated:,} B, measured {measured:,} B ({error:.1%} off)"


def measure_and_estimate(config, lora: peftkit.LoraConfig | None, batch: int, seq: int, **kwargs):
    """(measured, estimated breakdown) for one training step of a fresh model from ``config``."""
    from transformers import AutoModelForCausalLM

    dtype = kwargs.get("dtype", torch.float32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype).train()
    if lora is not None:
        model = peftkit.wrap(model, lora)
        model.train()
    if kwargs.get("grad_checkpointing") and lora is not None:
        model.gradient_checkpointing_enable()  # non-reentrant
    elif kwargs.get("grad_checkpointing"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    measured = measure_training_step(model, {"input_ids": ids, "labels": ids})
    result = estimate(config, method=lora or "lora", batch=batch, seq=seq, **kwargs)
    return measured, result.full if lora is None else result.peft


CASES = {
    "full": (None, {}),
    "full-bf16": (None, {"dtype": torch.bfloat16}),
    "lora-qv": (peftkit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), {}),
    "lora-all-linear": (peftkit.LoraConfig(r=8, target_modules="all-linear"), {}),
    "lora-dropout": (peftkit.LoraConfig(r=8, lora_dropout=0.1, target_modules="all-linear"), {}),
    "lora-dropout-bf16": (
        peftkit.LoraConfig(r=8, lora_dropout=0.1, target_modules="all-linear"),
        {"dtype": torch.bfloat16},
    ),
    "lora-mlp-only": (peftkit.LoraConfig(r=4, target_modules=["up_proj", "down_proj"]), {}),
}


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("case", list(CASES))
def test_estimate_matches_measurement_on_tiny_llama(case: str, fast: bool) -> None:
    lora, kwargs = CASES[case]
    with fast_lora(fast):
        measured, estimated = measure_and_estimate(tiny_llama_config(), lora, 4, 32, fast_lora=fast, **kwargs)
    assert measured.peak_source == "tracked tensors"
    for name in COMPONENTS:
        assert_close(getattr(estimated, name), getattr(measured, name), name)


@pytest.mark.parametrize(
    "lora", [None, peftkit.LoraConfig(r=8, target_modules="all-linear")], ids=["full", "lora"]
)
def test_estimate_matches_measured_peak_with_gradient_checkpointing(lora) -> None:
    """Saved-tensor hooks do not see inside checkpointed layers, so only the peak is compared."""
    measured, estimated = measure_and_estimate(tiny_llama_config(), lora, 4, 32, grad_checkpointing=True)
    assert_close(estimated.peak, measured.peak, "peak")
    _, without = measure_and_estimate(tiny_llama_config(), lora, 4, 32)
    assert estimated.peak < without.peak


@pytest.mark.parametrize("p", [0.1, 0.3], ids=["positions", "mask"])
def test_fast_lora_dropout_saves_the_dropped_elements_instead_of_two_float_copies(
    p: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measured difference is exactly what the fast path is for: per adapted layer, dropout's
    float noise and dropped copy (8 bytes per input element) against the record of which elements
    were dropped (the storages the fast path's draws returned, summed here)."""
    config = tiny_llama_config()
    lora = peftkit.LoraConfig(r=8, lora_dropout=p, target_modules="all-linear")
    records: list[Tensor] = []
    real = lora_adapters.draw_dropout

    def recording(x: Tensor, p: float) -> tuple[Tensor | None, float]:
        dropped, keep = real(x, p)
        records.append(dropped)
        return dropped, keep

    monkeypatch.setattr(lora_adapters, "draw_dropout", recording)
    with fast_lora(True):
        fast, _ = measure_and_estimate(config, lora, 4, 32)
    with fast_lora(False):
        plain, _ = measure_and_estimate(config, lora, 4, 32)
    tokens, h, i, layers = 4 * 32, 64, 160, 2
    adapted_inputs = tokens * (6 * h + i)  # q, k, v, o, gate and up read h values per token; down reads i
    assert len(records) % (layers * 7) == 0  # every measured step drew for 7 layers per block
    per_step = records[-layers * 7 :]
    assert all((r.dtype == torch.bool) == (p > POSITIONS_UP_TO) for r in per_step)
    recorded = sum(r.untyped_storage().nbytes() for r in per_step)
    # The fast path keeps the inputs of q/k/v, gate/up and down once each (o's input is attention's
    # output, saved anyway); the plain path kept only the dropped copies.
    shared_inputs = tokens * (2 * h + i) * 4
    # No gradient flows into the first layer's q/k/v input (the embedding is frozen): no noise kept there.
    first_layer_noise = 3 * tokens * h * 4
    expected = layers * (adapted_inputs * 8 - shared_inputs) - first_layer_noise - recorded
    assert plain.activations - fast.activations == expected


def test_70b_config_from_the_meta_device() -> None:
    h, i, layers, vocab, kv = 8192, 28672, 80, 128256, 8 * 128
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h  # q, k+v, o, gate/up/down, two norms
    total = vocab * h * 2 + layers * per_layer + h  # embedding, head, layers, final norm
    lora_qv = layers * 16 * ((h + h) + (h + kv))
    result = estimate(
        llama_70b_config(),
        r=16,
        targets=["q_proj", "v_proj"],
        batch=1,
        seq=4096,
        dtype="bfloat16",
        device_memory=80,
    )
    assert result.total_parameters == total
    assert result.peft.trainable_parameters == lora_qv
    assert result.full.weights == 2 * total
    assert result.full.gradients == 2 * total and result.full.optimizer_states == 4 * total
    assert result.peft.weights == 2 * total + 4 * lora_qv  # float32 adapters on a bf16 base
    assert result.peft.optimizer_states == 2 * 4 * lora_qv
    assert result.fits(result.full) is False and result.fits(result.peft) is False  # 141 GB of weights
    assert 4.0 < result.full.weights_multiple < 5.0  # bf16 weights + grads + two AdamW states, plus a bit
    table = format_estimate(result)
    assert "does not fit" in table and "70.55B" in table
    roomy = estimate(llama_70b_config(), dtype="bfloat16", device_memory=200)
    assert roomy.fits(roomy.peft) and not roomy.fits(roomy.full)


@pytest.mark.parametrize(
    ("optimizer", "bytes_per_parameter"), [("adamw", 8.0), ("sgd", 0.0), ("adamw8bit", 2.0)]
)
def test_optimizer_states_per_trainable_parameter(optimizer: str, bytes_per_parameter: float) -> None:
    result = estimate(tiny_llama_config(), optimizer=optimizer, batch=1, seq=8)
    for breakdown in (result.full, result.peft):
        per_parameter = breakdown.optimizer_states / breakdown.trainable_parameters
        assert per_parameter == pytest.approx(bytes_per_parameter, abs=0.01)


def test_bad_arguments_name_the_field() -> None:
    config = tiny_llama_config()
    with pytest.raises(ValueError, match="optimizer='adam'"):
        estimate(config, optimizer="adam")
    with pytest.raises(ValueError, match="dtype='int8'"):
        estimate(config, dtype="int8")
    with pytest.raises(ValueError, match="method='ia3'"):
        estimate(config, method="ia3")
    with pytest.raises(ValueError, match="no transformers config"):
        estimate(torch.nn.Linear(2, 2))


@pytest.mark.slow
@pytest.mark.parametrize(
    "lora",
    [None, peftkit.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")],
    ids=["full", "lora-all-linear-dropout"],
)
def test_estimate_matches_measurement_on_smollm2(lora) -> None:
    from peftkit.foundation.loading import load_model

    model, _ = load_model()
    model.train()
    config = model.config
    if lora is not None:
        model = peftkit.wrap(model, lora)
        model.train()
    ids = torch.randint(0, config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    measured = measure_training_step(model, {"input_ids": ids, "labels": ids})
    result = estimate(config, method=lora or "lora", batch=2, seq=128)
    estimated = result.full if lora is None else result.peft
    for name in COMPONENTS:
        assert_close(getattr(estimated, name), getattr(measured, name), name)


def test_measuring_with_peftkit_train_loss_skips_the_whole_logits() -> None:
    """``loss_fn``: the fused head + cross-entropy of ``peftkit train`` holds no (tokens, vocab) logits."""
    from transformers import AutoModelForCausalLM

    from peftkit.objectives.tokens import loss_sum

    config = tiny_llama_config()
    config.vocab_size = 4000
    torch.manual_seed(0)
    model = peftkit.wrap(
        AutoModelForCausalLM.from_config(config), peftkit.LoraConfig(r=8, target_modules="all-linear")
    )
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    calls = []

    def train_loss(m, batch):
        calls.append(1)
        total, count = loss_sum(m, batch, "causal-lm")
        return total / count

    plain = measure_training_step(model, inputs)
    fused = measure_training_step(model, inputs, loss_fn=train_loss)
    logits_bytes = ids.numel() * config.vocab_size * 4
    assert len(calls) == 2  # the warm-up step and the measured one
    assert fused.gradients == plain.gradients and fused.optimizer_states == plain.optimizer_states
    assert plain.peak - fused.peak > 1.5 * logits_bytes  # here 1.9x: the logits and their gradient


@pytest.mark.parametrize("quantize", ["nf4", "fp4", "int8"])
def test_a_quantized_base_leaves_the_full_fine_tuning_column_alone(quantize: str) -> None:
    """Full fine-tuning trains the float weights themselves: ``quantize`` (the PEFT column's base) must
    not change its numbers, while it does change the PEFT column's weights."""
    config = tiny_llama_config()
    config.vocab_size = 32_000  # the logits dominate the peak, as on real models (SmolLM2: 49,152)
    plain = estimate(config, batch=8, seq=512)
    quantized = estimate(config, batch=8, seq=512, quantize=quantize)
    assert quantized.full == plain.full
    assert quantized.peft.weights < plain.peft.weights
