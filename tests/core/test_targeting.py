"""Targeting: names, suffixes, regexes, all-linear, layer indices, exclusions and the errors."""

from __future__ import annotations

import pytest
from torch import nn

import peftkit
from peftkit.core.layer import AdapterLayer
from peftkit.core.targeting import find_targets, layer_index, name_matches

from helpers.tiny_models import TINY_MODELS

LLAMA = TINY_MODELS[1]
GPT2 = TINY_MODELS[2]


def targets(model: nn.Module, **kwargs: object) -> list[str]:
    return find_targets(model, peftkit.LoraConfig(**kwargs))


@pytest.mark.parametrize(
    ("name", "patterns", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", ["q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["proj"], False),  # a suffix starts at a dot
        ("q_proj", ["q_proj"], True),
        ("model.layers.0.self_attn.q_proj", r".*\.0\..*q_proj", True),
        ("model.layers.0.self_attn.q_proj", r"q_proj", False),  # a regex matches the whole name
    ],
)
def test_name_matches(name: str, patterns: object, expected: bool) -> None:
    assert name_matches(name, patterns) is expected


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("model.layers.3.mlp.up_proj", None, 3),
        ("transformer.h.11.attn.c_attn", None, 11),
        ("transformer.h.11.attn.c_attn", "h", 11),
        ("encoder.block.1.layer.0.SelfAttention.q", "block", 1),
        ("lm_head", None, None),
    ],
)
def test_layer_index(name: str, pattern: str | None, expected: int | None) -> None:
    assert layer_index(name, pattern) == expected


def test_suffix_list_selects_every_layer() -> None:
    found = targets(LLAMA.make(), target_modules=["q_proj", "v_proj"])
    assert found == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_regex_selects_full_names() -> None:
    found = targets(LLAMA.make(), target_modules=r".*layers\.1\.mlp\.(up|down)_proj")
    assert found == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_all_linear_leaves_out_the_output_head() -> None:
    model = LLAMA.make()
    found = targets(model, target_modules="all-linear")
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "lm_head" in linear
    assert found == [n for n in linear if n != "lm_head"]
    assert len(found) == 2 * 7


def test_all_linear_includes_transformers_conv1d() -> None:
    found = targets(GPT2.make(), target_modules="all-linear")
    assert "transformer.h.0.attn.c_attn" in found and "transformer.h.1.mlp.c_proj" in found
    assert "lm_head" not in found


def test_layers_to_transform_and_pattern() -> None:
    model = LLAMA.make()
    only_second = targets(model, target_modules=["q_proj"], layers_to_transform=[1])
    assert only_second == ["model.layers.1.self_attn.q_proj"]
    assert targets(model, target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers") == [
        "model.layers.0.self_attn.q_proj"
    ]


def test_exclude_modules() -> None:
    found = targets(LLAMA.make(), target_modules="all-linear", exclude_modules=["o_proj", "mlp.down_proj"])
    assert not any(n.endswith(("o_proj", "down_proj")) for n in found)
    assert any(n.endswith("up_proj") for n in found)


def test_no_match_names_the_field_and_lists_candidates() -> None:
    with pytest.raises(ValueError) as error:
        targets(LLAMA.make(), target_modules=["query"])
    message = str(error.value)
    assert "target_modules=['query'] matched no module" in message
    for candidate in ("q_proj (Linear x2)", "gate_proj (Linear x2)", "embed_tokens (Embedding x1)"):
        assert candidate in message


def test_an_entry_that_matches_nothing_is_an_error_naming_it() -> None:
    # one misspelt entry beside a good one used to train the good one alone, silently
    with pytest.raises(ValueError) as error:
        targets(LLAMA.make(), target_modules=["q_prj", "v_proj"])
    message = str(error.value)
    assert "entry 'q_prj' matches no module" in message and "did you mean 'q_proj'" in message
    assert "v_proj (Linear x2)" in message


def test_files_with_entries_absent_here_load_with_a_warning(tmp_path) -> None:
    model = peftkit.wrap(LLAMA.make(), peftkit.LoraConfig(target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(config.read_text().replace('"v_proj"', '"v_proj", "query_key_value"'))
    with pytest.warns(UserWarning, match="entry 'query_key_value' matches no module"):
        loaded = peftkit.load(LLAMA.make(), tmp_path)
    adapted = [n for n, m in loaded.named_modules() if isinstance(m, AdapterLayer)]
    assert adapted and adapted == [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def test_candidates_are_capped_at_20() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)])
    with pytest.raises(ValueError, match=r"and 10 more"):
        targets(model, target_modules=["nothing"])


def test_unset_target_modules_is_an_error() -> None:
    with pytest.raises(ValueError, match="target_modules is not set"):
        targets(LLAMA.make())


def test_exclusion_that_removes_everything() -> None:
    with pytest.raises(ValueError, match="exclude_modules=\\['q_proj'\\] excluded every module"):
        targets(LLAMA.make(), target_modules=["q_proj"], exclude_modules=["q_proj"])


def test_layers_to_transform_that_keeps_nothing() -> None:
    with pytest.raises(ValueError, match=r"layers_to_transform=\[7\].*indices are \[0, 1\]"):
        targets(LLAMA.make(), target_modules=["q_proj"], layers_to_transform=[7])


def test_unsupported_type_is_not_a_candidate() -> None:
    with pytest.raises(ValueError, match="matched no module of a supported type"):
        targets(LLAMA.make(), target_modules=["input_layernorm"])


def test_second_adapter_lands_in_the_same_wrapper() -> None:
    model = peftkit.wrap(LLAMA.make(), peftkit.LoraConfig(target_modules=["q_proj"]))
    assert find_targets(model.model, peftkit.LoraConfig(target_modules="all-linear"))[0] == (
        "model.layers.0.self_attn.q_proj"
    )
    model.add_adapter("b", peftkit.LoraConfig(target_modules=["q_proj"]))
    wrapper = model.model.model.layers[0].self_attn.q_proj
    assert sorted(wrapper.adapters) == ["b", "default"]
