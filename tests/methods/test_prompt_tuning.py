"""Prompt tuning on Llama, GPT-2, BERT (sequence classification) and T5.

Independent references: the base model fed the same vectors as real tokens (a prompt equal to the
embeddings of tokens ``c`` must give exactly the base model's outputs on ``c + input``), greedy
decoding by full recomputation, and plain cross-entropy. fp32; atol 1e-5 unless stated.
Hugging Face PEFT as an oracle: ``tests/test_hf_oracle_prompts.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.methods.prompt_tuning import PromptEmbedding

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
    tiny_by_name,
    toy_task_loss_falls,
)
from helpers.tiny_models import VOCAB, TinyModel


def config(tiny: TinyModel, **fields: object) -> peftkit.PromptTuningConfig:
    return peftkit.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL, task_type=TASKS[tiny.name], **fields)


@pytest.fixture(params=PROMPT_MODELS, ids=lambda tiny: tiny.name)
def tiny(request: pytest.FixtureRequest) -> TinyModel:
    return request.param


def test_prompt_equal_to_token_embeddings_gives_base_outputs_on_those_tokens(tiny: TinyModel) -> None:
    """Prompt = E(c) ⇒ the model computes base(c + input) (decoder: on the input's positions)."""
    base = make_base(tiny)
    inputs = model_inputs(tiny)
    context = torch.tensor([11, 12, 13])  # (n,)
    with torch.no_grad():
        joined = {**inputs, "input_ids": torch.cat([context.expand(3, -1), inputs["input_ids"]], dim=1)}
        joined["attention_mask"] = torch.ones_like(joined["input_ids"])
        expected = base(**joined).logits
    model = peftkit.wrap(base, config(tiny))
    prompt = model.model_adapters["default"].embedding.weight
    with torch.no_grad():
        prompt[:N_VIRTUAL].copy_(base.get_input_embeddings().weight[context])  # T5: the encoder's rows
        actual = model(**inputs).logits
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)  # a SEQ_CLS head copy starts equal


def test_base_frozen_and_only_the_prompt_trains(tiny: TinyModel) -> None:
    check_base_frozen_and_prompt_trains(tiny, config(tiny))


def test_disable_adapters_gives_the_base_model(tiny: TinyModel) -> None:
    check_disable_gives_base(tiny, config(tiny))


def test_save_load_round_trip(tiny: TinyModel, tmp_path) -> None:
    check_save_load_round_trip(tiny, config(tiny), tmp_path)


def test_merge_is_refused_clearly(tiny: TinyModel) -> None:
    check_not_mergeable(tiny, config(tiny))


def test_mixed_batches_are_refused(tiny: TinyModel) -> None:
    check_mixed_batch_refused(tiny, config(tiny))


@pytest.mark.parametrize("name", [*DECODER_ONLY, "t5"])
def test_generate_equals_greedy_recomputation(name: str) -> None:
    check_generate_matches_recomputation(tiny_by_name(name), config(tiny_by_name(name)))


@pytest.mark.parametrize("name", DECODER_ONLY)
def test_labels_on_virtual_positions_are_ignored(name: str) -> None:
    """Plain next-token cross-entropy where virtual positions are never targets; the last virtual
    position predicts the first real token."""
    tiny = tiny_by_name(name)
    model = peftkit.wrap(make_base(tiny), config(tiny))
    inputs = model_inputs(tiny)
    labels = inputs["input_ids"].clone()  # (batch, seq)
    labels[1, 2] = -100
    with torch.no_grad():
        output = model(**inputs, labels=labels)
    predicting = output.logits[:, N_VIRTUAL - 1 : -1].reshape(-1, VOCAB)  # positions n-1 … n+seq-2
    expected = F.cross_entropy(predicting, labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", DECODER_ONLY)
def test_position_ids_continue_after_the_virtual_tokens(name: str) -> None:
    tiny = tiny_by_name(name)
    model = peftkit.wrap(make_base(tiny), config(tiny))
    inputs = model_inputs(tiny)
    positions = torch.arange(inputs["input_ids"].shape[1]).expand(3, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs, position_ids=positions).logits, model(**inputs).logits, atol=ATOL, rtol=0
        )


def test_token_type_ids_are_lengthened_for_bert() -> None:
    tiny = tiny_by_name("bert")
    model = peftkit.wrap(make_base(tiny), config(tiny))
    inputs = model_inputs(tiny)
    with torch.no_grad():
        without = model(**inputs).logits
        with_types = model(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"])).logits
    torch.testing.assert_close(with_types, without, atol=ATOL, rtol=0)


def test_sample_vocab_init_copies_vocabulary_rows() -> None:
    tiny = tiny_by_name("llama")
    base = make_base(tiny)
    torch.manual_seed(0)
    model = peftkit.wrap(base, config(tiny, prompt_tuning_init="SAMPLE_VOCAB"))
    prompt = model.model_adapters["default"].embedding.weight
    vocab = base.get_input_embeddings().weight
    for row in prompt:
        assert (vocab == row).all(dim=1).any(), "a prompt row is not a row of the embedding matrix"


class FakeTokenizer:
    """Tokenizes by characters: 'abc' → [1, 2, 3] (ord - 96)."""

    name_or_path = "fake/char-tokenizer"

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(ch) - 96 for ch in text]}


@pytest.mark.parametrize(("text", "expected_ids"), [("ab", [1, 2, 1, 2, 1]), ("abcdefg", [1, 2, 3, 4, 5])])
def test_text_init_repeats_or_cuts_the_text_tokens(text: str, expected_ids: list[int], tmp_path) -> None:
    tiny = tiny_by_name("llama")
    base = make_base(tiny)
    cfg = peftkit.PromptTuningConfig(
        num_virtual_tokens=5,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer=FakeTokenizer(),
    )
    model = peftkit.wrap(base, cfg)
    expected = base.get_input_embeddings().weight[expected_ids]
    torch.testing.assert_close(model.model_adapters["default"].embedding.weight, expected, atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    written = peftkit.load(make_base(tiny), tmp_path).peft_config["default"]
    assert written.tokenizer_name_or_path == "fake/char-tokenizer"  # loading needs no tokenizer


def test_seq2seq_saves_encoder_and_decoder_rows_and_uses_the_encoder_ones() -> None:
    tiny = tiny_by_name("t5")
    model = peftkit.wrap(make_base(tiny), config(tiny))
    adapter = model.model_adapters["default"]
    assert isinstance(adapter, PromptEmbedding)
    assert adapter.embedding.weight.shape == (2 * N_VIRTUAL, 32)
    inputs = model_inputs(tiny)
    with torch.no_grad():
        before = model(**inputs).logits
        adapter.embedding.weight[N_VIRTUAL:] += 1.0  # the decoder rows
        after = model(**inputs).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_virtual_tokens": None}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 0}, "positive integer"),
        ({"num_virtual_tokens": 4, "target_modules": ["q_proj"]}, "target_modules does not apply"),
        ({"num_virtual_tokens": 4, "prompt_tuning_init": "text"}, "must be one of"),
        ({"num_virtual_tokens": 4, "prompt_tuning_init": "TEXT"}, "prompt_tuning_init_text"),
        (
            {"num_virtual_tokens": 4, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Hi"},
            "needs a tokenizer",
        ),
    ],
)
def test_config_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        peftkit.PromptTuningConfig(**fields)


def test_plain_torch_model_is_refused_with_a_clear_error() -> None:
    from helpers.tiny_models import TINY_MODELS

    with pytest.raises(TypeError, match="needs a transformers model"):
        peftkit.wrap(TINY_MODELS[0].make(), peftkit.PromptTuningConfig(num_virtual_tokens=2, token_dim=16))


def test_training_lowers_the_loss_on_a_toy_task() -> None:
    first, last = toy_task_loss_falls(peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    assert last < 0.5 * first, (first, last)


def test_inputs_by_position_or_as_embeddings_give_the_same_outputs() -> None:
    tiny = tiny_by_name("llama")
    base = make_base(tiny)
    model = peftkit.wrap(base, config(tiny))
    ids = model_inputs(tiny)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
        embeds = base.get_input_embeddings()(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, expected, atol=ATOL, rtol=0)


def test_prompt_and_lora_compose_and_come_apart() -> None:
    tiny = tiny_by_name("gpt2")
    base = make_base(tiny)
    inputs = model_inputs(tiny)
    with torch.no_grad():
        base_logits = base(**inputs).logits
    model = peftkit.wrap(base, config(tiny))
    with torch.no_grad():
        prompt_only = model(**inputs).logits
    model.add_adapter("lora", peftkit.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    model.set_adapter(["default", "lora"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {
        "model_adapters.default.embedding.weight"
    }
    with torch.no_grad():
        both = model(**inputs).logits
        assert not torch.allclose(both, prompt_only, atol=1e-4), "LoRA does not act beside the prompt"
        with model.disable_adapters():
            torch.testing.assert_close(model(**inputs).logits, base_logits, atol=ATOL, rtol=0)
    model.delete_adapter("default")
    assert "default" not in model.model_adapters and model.active_adapters == ["lora"]
    model.delete_adapter("lora")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base_logits, atol=ATOL, rtol=0)
