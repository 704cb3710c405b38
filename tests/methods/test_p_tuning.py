"""P-tuning (MLP and LSTM prompt encoders) on Llama, GPT-2, BERT (sequence classification) and T5.

Independent references: the encoder written out with ``torch.nn.functional``, the base model fed
``inputs_embeds`` built here by hand, greedy decoding by full recomputation. fp32; atol 1e-5.
Hugging Face PEFT as an oracle: ``tests/methods/test_hf_oracle_prompts.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.methods.p_tuning import PromptEncoder

from helpers.model_level import (
    ATOL,
    DECODER_ONLY,
    N_VIRTUAL,
    PROMPT_MODELS,
    TASKS,
    check_base_frozen_and_prompt_trains,
    check_disable_gives_base,
    check_generate_matches_recomputation,
    check_mixed_batch_refused,
    check_not_mergeable,
    check_save_load_round_trip,
    make_base,
    model_inputs,
    randomize,
    tiny_by_name,
    toy_task_loss_falls,
)
from helpers.tiny_models import TinyModel

ENCODERS = ("MLP", "LSTM")


def config(tiny: TinyModel, encoder: str = "MLP", **fields: object) -> peftkit.PromptEncoderConfig:
    return peftkit.PromptEncoderConfig(
        num_virtual_tokens=N_VIRTUAL,
        task_type=TASKS[tiny.name],
        encoder_reparameterization_type=encoder,
        encoder_hidden_size=16,
        **fields,
    )


GRID = [(tiny, encoder) for tiny in PROMPT_MODELS for encoder in ENCODERS]


@pytest.fixture(params=GRID, ids=lambda case: f"{case[0].name}-{case[1]}")
def case(request: pytest.FixtureRequest) -> tuple[TinyModel, str]:
    return request.param


def test_mlp_encoder_is_linear_relu_linear_relu_linear() -> None:
    tiny = tiny_by_name("llama")
    model = peftkit.wrap(make_base(tiny), config(tiny))
    randomize(model, seed=0)
    encoder = model.model_adapters["default"]
    first, second, third = (encoder.mlp_head[i] for i in (0, 2, 4))
    tokens = encoder.embedding.weight  # (n, dim)
    hidden = F.relu(tokens @ first.weight.T + first.bias)  # (n, 16)
    hidden = F.relu(hidden @ second.weight.T + second.bias)  # (n, 16)
    expected = hidden @ third.weight.T + third.bias  # (n, dim)
    torch.testing.assert_close(encoder.virtual_tokens(), expected, atol=ATOL, rtol=0)


def test_lstm_encoder_is_bidirectional_lstm_then_mlp() -> None:
    tiny = tiny_by_name("llama")
    model = peftkit.wrap(make_base(tiny), config(tiny, "LSTM"))
    encoder = model.model_adapters["default"]
    assert encoder.lstm_head.bidirectional and encoder.lstm_head.hidden_size == 16
    states = encoder.lstm_head(encoder.embedding.weight.unsqueeze(0))[0]  # (1, n, 32)
    expected = encoder.mlp_head(states)[0]  # (n, dim)
    torch.testing.assert_close(encoder.virtual_tokens(), expected, atol=0, rtol=0)
    assert expected.shape == (N_VIRTUAL, 32)


def test_forward_prepends_the_encoder_output(case: tuple[TinyModel, str]) -> None:
    """The model computes the base model on [encoder output; E(input)] with the mask lengthened."""
    tiny, encoder = case
    base = make_base(tiny)
    model = peftkit.wrap(base, config(tiny, encoder))
    randomize(model.model_adapters, seed=1)  # a SEQ_CLS head copy stays equal to the original head
    inputs = model_inputs(tiny, padded=True)
    with torch.no_grad():
        tokens = model.model_adapters["default"].virtual_tokens()[:N_VIRTUAL]  # (n, dim)
        embeds = base.get_input_embeddings()(inputs["input_ids"])  # (batch, seq, dim)
        joined = torch.cat([tokens.expand(3, -1, -1), embeds], dim=1)
        mask = torch.cat([torch.ones(3, N_VIRTUAL, dtype=torch.long), inputs["attention_mask"]], dim=1)
        rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        with model.disable_adapters():
            expected = model(inputs_embeds=joined, attention_mask=mask, **rest).logits
        actual = model(**inputs).logits
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_base_frozen_and_only_the_encoder_trains(case: tuple[TinyModel, str]) -> None:
    check_base_frozen_and_prompt_trains(case[0], config(*case))


def test_disable_adapters_gives_the_base_model(case: tuple[TinyModel, str]) -> None:
    check_disable_gives_base(case[0], config(*case))


def test_save_load_round_trip(case: tuple[TinyModel, str], tmp_path) -> None:
    check_save_load_round_trip(case[0], config(*case), tmp_path)


def test_saved_tensor_is_the_encoder_output_and_reloads_as_a_plain_embedding(tmp_path) -> None:
    from safetensors.torch import load_file

    tiny = tiny_by_name("llama")
    model = peftkit.wrap(make_base(tiny), config(tiny, "LSTM"))
    randomize(model, seed=2)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"]
    torch.testing.assert_close(
        saved, model.model_adapters["default"].virtual_tokens().detach(), atol=0, rtol=0
    )
    loaded = peftkit.load(make_base(tiny), tmp_path, is_trainable=True).model_adapters["default"]
    assert isinstance(loaded, PromptEncoder) and loaded.mlp_head is None and loaded.lstm_head is None
    assert torch.equal(loaded.embedding.weight, saved)
    assert loaded.embedding.weight.requires_grad, "reloaded with is_trainable: the vectors train directly"


def test_merge_is_refused_clearly() -> None:
    tiny = tiny_by_name("llama")
    check_not_mergeable(tiny, config(tiny))


def test_mixed_batches_are_refused() -> None:
    tiny = tiny_by_name("gpt2")
    check_mixed_batch_refused(tiny, config(tiny))


@pytest.mark.parametrize("name", [*DECODER_ONLY, "t5"])
def test_generate_equals_greedy_recomputation(name: str) -> None:
    tiny = tiny_by_name(name)
    check_generate_matches_recomputation(tiny, config(tiny, "LSTM"))


def test_mlp_warns_that_encoder_num_layers_is_ignored() -> None:
    tiny = tiny_by_name("llama")
    with pytest.warns(UserWarning, match="encoder_num_layers=4 is ignored"):
        peftkit.wrap(make_base(tiny), config(tiny, encoder_num_layers=4))


def test_encoder_hidden_size_defaults_to_token_dim() -> None:
    tiny = tiny_by_name("gpt2")
    model = peftkit.wrap(make_base(tiny), peftkit.PromptEncoderConfig(num_virtual_tokens=2))
    assert model.peft_config["default"].encoder_hidden_size == model.peft_config["default"].token_dim == 32


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"encoder_reparameterization_type": "GRU"}, "must be one of"),
        ({"encoder_dropout": 1.5}, "encoder_dropout"),
        ({"num_virtual_tokens": -1}, "positive integer"),
    ],
)
def test_config_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        peftkit.PromptEncoderConfig(**{"num_virtual_tokens": 4, **fields})


@pytest.mark.parametrize("encoder", ENCODERS)
def test_training_lowers_the_loss_on_a_toy_task(encoder: str) -> None:
    cfg = peftkit.PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type=encoder)
    first, last = toy_task_loss_falls(cfg)
    assert last < 0.5 * first, (first, last)
