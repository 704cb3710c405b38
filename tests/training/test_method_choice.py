"""peftkit.training.method_choice: --method NAME + options → a config object, and the one naming error."""

from __future__ import annotations

import pytest

import peftkit
from peftkit.foundation.errors import UsageError
from peftkit.training.method_choice import (
    FULL,
    METHOD_NAMES,
    build_method_config,
    method_entry,
    method_fields,
    resolved_options,
    unknown_name,
)
from peftkit.training.train_config import FIELDS


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_table_method_and_full_are_names() -> None:
    assert METHOD_NAMES[-1] == FULL and "lora" in METHOD_NAMES and "ia3" in METHOD_NAMES
    assert method_entry(FULL) is None
    assert method_entry("lora").config_class is peftkit.LoraConfig
    with pytest.raises(UsageError, match=r"unknown method 'lroa'; use one of .*did you mean 'lora'"):
        method_entry("lroa")


def test_a_variants_fixed_option_is_not_the_users() -> None:
    assert {"r", "lora_alpha", "target_modules", "use_dora"} <= method_fields("lora")
    assert "r" in method_fields("dora") and "use_dora" not in method_fields("dora")
    assert method_fields(FULL) == set()


def test_build_uses_the_tables_defaults_under_the_users_options() -> None:
    lora = build_method_config("lora", {"r": 4}, "causal-lm")
    # target_modules unset: the model's own default targets are filled in when the adapter is added
    assert (lora.r, lora.lora_alpha, lora.target_modules, lora.task_type) == (4, 16, None, "CAUSAL_LM")
    dora = build_method_config("dora", {}, "seq-cls")
    assert dora.use_dora and dora.task_type == "SEQ_CLS"
    assert build_method_config(FULL, {}, "causal-lm") is None


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("full", {"r": 8}, r"method 'full' takes no method_options, got \['r'\]"),
        (
            "lora",
            {"lora_r": 8},
            r"unknown option 'lora_r' for method 'lora' \(LoraConfig\).*did you mean 'r'",
        ),
        ("lora", {"r": 0}, r"method 'lora': .*r"),
    ],
)
def test_bad_options_are_one_clear_error(method: str, options: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_method_config(method, options, "causal-lm")


def test_resolved_options_are_what_the_run_records() -> None:
    # the table's defaults, and no targets: the architecture's are chosen when the adapter is added
    assert resolved_options("lora", {"r": 4}) == {"r": 4, "lora_alpha": 16}
    assert resolved_options(FULL, {}) == {}
    assert resolved_options("ia3", {}) == {}
    assert resolved_options("ia3", {"target_modules": ["q_proj"]}) == {"target_modules": ["q_proj"]}
    options = {"target_modules": ["q_proj"]}
    resolved = resolved_options("lora", options)
    resolved["target_modules"].append("v_proj")  # a copy: the user's dict stays as it was
    assert options == {"target_modules": ["q_proj"]}


def test_unknown_names_say_whose_option_it_is_or_the_closest_spelling() -> None:
    other = unknown_name("num_virtual_tokens", "lora", FIELDS, "in run.yaml")
    assert str(other) == (
        "unknown setting 'num_virtual_tokens' in run.yaml: not a peftkit train setting nor an option of "
        "method 'lora' (num_virtual_tokens is an option of method prompt, p-tuning, prefix)"
    )
    alias = unknown_name("learning_rate", "lora", FIELDS, "", spell=flag)
    assert "unknown setting '--learning-rate': " in str(alias) and "did you mean '--lr'" in str(alias)
    typo = unknown_name("lora_alfa", "lora", FIELDS, "")
    assert "did you mean 'lora_alpha'" in str(typo)
