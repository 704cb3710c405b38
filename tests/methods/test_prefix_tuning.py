"""Prefix tuning on Llama (grouped-query attention), GPT-2, BERT (sequence classification) and T5.

Independent reference: a prefix set to the keys and values the base model itself computes for a real
context ``c`` must give exactly the base model's outputs on ``c + input`` (on the input's positions):
the prefix *is* a cached context. This checks the layout (layer, key/value, head, position), the
position offset and the attention mask against transformers alone, for every layer. Greedy decoding
by full recomputation checks ``generate``. fp32; atol 1e-5.
Hugging Face PEFT as an oracle: ``tests/methods/test_hf_oracle_prompts.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import peftkit
from peftkit.methods.prefix_tuning import PrefixEncoder

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

CONTEXT = torch.tensor([[11, 12, 13]])  # (1, n): the real tokens whose keys/values become the prefix


def config(tiny: TinyModel, projection: bool = False, **fields: object) -> peftkit.PrefixTuningConfig:
    extra = {"prefix_projection": True, "encoder_hidden_size": 16} if projection else {}
    return peftkit.PrefixTuningConfig(
        num_virtual_tokens=N_VIRTUAL, task_type=TASKS[tiny.name], **extra, **fields
    )


GRID = [(tiny, projection) for tiny in PROMPT_MODELS for projection in (False, True)]


@pytest.fixture(params=GRID, ids=lambda case: f"{case[0].name}{'-projection' if case[1] else ''}")
def case(request: pytest.FixtureRequest) -> tuple[TinyModel, bool]:
    return request.param


def flatten_cache(cache: object) -> Tensor:
    """A transformers cache of n positions → the prefix table (n, layers · 2 · heads · head_dim)."""
    rows = []
    for layer in cache.layers:  # keys/values: (1, heads, n, head_dim)
        for states in (layer.keys, layer.values):
            rows.append(states[0].permute(1, 0, 2).flatten(1))  # (n, heads · head_dim)
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize("name", [*DECODER_ONLY, "t5"])
def test_prefix_of_cached_context_gives_base_outputs_on_context_plus_input(name: str) -> None:
    tiny = tiny_by_name(name)
    base = make_base(tiny)
    inputs = model_inputs(tiny, batch=1 if name == "t5" else 3)
    batch, n = inputs["input_ids"].shape[0], CONTEXT.shape[1]
    with torch.no_grad():
        if name == "t5":  # the decoder's context; its self-attention states also read the encoder
            context = base(input_ids=inputs["input_ids"], decoder_input_ids=CONTEXT, use_cache=True)
            cache = context.past_key_values.self_attention_cache
            joined = torch.cat([CONTEXT, inputs["decoder_input_ids"]], dim=1)
            expected = base(input_ids=inputs["input_ids"], decoder_input_ids=joined).logits[:, n:]
        else:
            cache = base(input_ids=CONTEXT, use_cache=True).past_key_values
            joined = torch.cat([CONTEXT.expand(batch, -1), inputs["input_ids"]], dim=1)
            expected = base(input_ids=joined).logits[:, n:]
    model = peftkit.wrap(base, config(tiny))
    prefix = model.model_adapters["default"].embedding.weight
    assert prefix.shape == flatten_cache(cache).shape
    with torch.no_grad():
        prefix.copy_(flatten_cache(cache))
        actual = model(**inputs).logits
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_grouped_query_attention_prefix_has_the_key_value_heads_width() -> None:
    tiny = tiny_by_name("llama")  # 4 query heads, 2 key/value heads of width 8, 2 layers
    resolved = peftkit.wrap(make_base(tiny), config(tiny)).peft_config["default"]
    assert (resolved.token_dim, resolved.num_attention_heads, resolved.num_layers) == (16, 2, 2)


def test_projection_is_linear_tanh_linear_over_an_embedding() -> None:
    tiny = tiny_by_name("gpt2")
    model = peftkit.wrap(make_base(tiny), config(tiny, projection=True))
    randomize(model, seed=0)
    encoder = model.model_adapters["default"]
    first, second = encoder.transform[0], encoder.transform[2]
    hidden = torch.tanh(encoder.embedding.weight @ first.weight.T + first.bias)  # (n, 16)
    expected = hidden @ second.weight.T + second.bias  # (n, layers · 2 · dim)
    torch.testing.assert_close(encoder.prefix_states(), expected, atol=ATOL, rtol=0)
    assert expected.shape == (N_VIRTUAL, 2 * 2 * 32)


def test_base_frozen_and_only_the_prefix_trains(case: tuple[TinyModel, bool]) -> None:
    check_base_frozen_and_prompt_trains(case[0], config(*case))


def test_disable_adapters_gives_the_base_model(case: tuple[TinyModel, bool]) -> None:
    check_disable_gives_base(case[0], config(*case))


def test_save_load_round_trip(case: tuple[TinyModel, bool], tmp_path) -> None:
    check_save_load_round_trip(case[0], config(*case), tmp_path)


def test_projection_is_saved_as_its_output_and_reloads_as_the_prefix_table(tmp_path) -> None:
    tiny = tiny_by_name("llama")
    model = peftkit.wrap(make_base(tiny), config(tiny, projection=True))
    randomize(model, seed=1)
    model.save_pretrained(tmp_path)
    loaded = peftkit.load(make_base(tiny), tmp_path).model_adapters["default"]
    assert isinstance(loaded, PrefixEncoder) and loaded.transform is None
    assert loaded.embedding.weight.shape == (N_VIRTUAL, 2 * 2 * 16)
    expected = model.model_adapters["default"].prefix_states().detach()
    torch.testing.assert_close(loaded.embedding.weight, expected, atol=0, rtol=0)


def test_merge_is_refused_clearly() -> None:
    tiny = tiny_by_name("llama")
    check_not_mergeable(tiny, config(tiny))


def test_mixed_batches_are_refused() -> None:
    tiny = tiny_by_name("llama")
    check_mixed_batch_refused(tiny, config(tiny))


@pytest.mark.parametrize("name", [*DECODER_ONLY, "t5"])
def test_generate_equals_greedy_recomputation(name: str) -> None:
    tiny = tiny_by_name(name)
    check_generate_matches_recomputation(tiny, config(tiny))


def test_generate_with_beams_gets_one_prefix_per_beam() -> None:
    tiny = tiny_by_name("llama")
    model = peftkit.wrap(make_base(tiny), config(tiny))
    ids = model_inputs(tiny)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert out.shape == (3, ids.shape[1] + 3) and torch.equal(out[:, : ids.shape[1]], ids)


def test_position_ids_are_shifted_past_the_prefix() -> None:
    tiny = tiny_by_name("gpt2")  # absolute position embeddings: a wrong offset changes everything
    model = peftkit.wrap(make_base(tiny), config(tiny))
    inputs = model_inputs(tiny)
    positions = torch.arange(inputs["input_ids"].shape[1]).expand(3, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs, position_ids=positions).logits, model(**inputs).logits, atol=ATOL, rtol=0
        )


def test_a_filled_cache_from_the_caller_is_refused() -> None:
    tiny = tiny_by_name("llama")
    base = make_base(tiny)
    with torch.no_grad():
        cache = base(input_ids=CONTEXT, use_cache=True).past_key_values
    model = peftkit.wrap(base, config(tiny))
    with pytest.raises(ValueError, match="use generate"):
        model(input_ids=CONTEXT, past_key_values=cache)


def test_gradient_checkpointing_is_refused_while_training() -> None:
    tiny = tiny_by_name("llama")
    model = peftkit.wrap(make_base(tiny), config(tiny))
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**model_inputs(tiny))


def test_zero_init_gives_zero_prefixes() -> None:
    tiny = tiny_by_name("llama")
    for projection in (False, True):
        encoder = peftkit.wrap(make_base(tiny), config(tiny, projection, init_weights="zero"))
        assert torch.count_nonzero(encoder.model_adapters["default"].prefix_states()) == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"init_weights": "ones"}, "init_weights"), ({"num_virtual_tokens": 2.5}, "positive integer")],
)
def test_config_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        peftkit.PrefixTuningConfig(**{"num_virtual_tokens": 4, **fields})


@pytest.mark.parametrize("projection", [False, True])
def test_training_lowers_the_loss_on_a_toy_task(projection: bool) -> None:
    extra = {"prefix_projection": True} if projection else {}
    first, last = toy_task_loss_falls(peftkit.PrefixTuningConfig(num_virtual_tokens=4, **extra))
    assert last < 0.5 * first, (first, last)
