"""Hugging Face PEFT as an oracle for peftkit's LoRA: same files, same keys, same configs, same logits.

Table-driven over (tiny model × LoRA config). For every case:

- peftkit writes, HF PEFT reads (``PeftModel.from_pretrained``), and the logits agree;
- HF PEFT writes (``save_pretrained``), peftkit reads (``peftkit.load``), and the logits agree;
- the same adapter tensors put into both libraries in memory (no files) give the same logits;
- the two libraries' files for the same adapter have the same keys and shapes;
- each library's ``adapter_config.json`` makes the other build an equivalent config.

Adapters get seeded random values (every trainable parameter: LoRA factors, ``modules_to_save``
copies, trained biases), so a tensor that is dropped or misplaced changes the logits; each case also
checks that its adapter moves the logits well beyond the tolerance. All models are fp32 in eval mode;
logits must agree within ``ATOL = 1e-5`` (absolute).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn

import peftkit

from helpers.tiny_models import TINY_MODELS, TinyModel, output_of, twin

peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402
from peft.utils import set_peft_model_state_dict  # noqa: E402

ATOL = 1e-5  # absolute, on fp32 outputs of magnitude ~1; the libraries differ only in summation order
MIN_EFFECT = 1e-3  # an adapter must move the outputs at least this much, or equality would prove nothing
RANDOM_SCALE = 0.2
MODELS = {model.name: model for model in TINY_MODELS}
# HF PEFT's config fields that decide which modules are adapted and how; compared across libraries.
COMPARED_FIELDS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "modules_to_save",
    "layers_to_transform",
)


@dataclass(frozen=True)
class Case:
    """One oracle case: a tiny model and the LoRA fields given identically to both libraries."""

    id: str
    model: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def tiny(self) -> TinyModel:
        return MODELS[self.model]

    def peftkit_config(self) -> peftkit.LoraConfig:
        return peftkit.LoraConfig(**self.fields, init_lora_weights=False)

    def hf_config(self) -> Any:
        return peft.LoraConfig(**self.fields, init_lora_weights=False)

    def __str__(self) -> str:
        return self.id


CASES = [
    Case("llama-lora", "llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    Case(
        "llama-rslora",
        "llama",
        dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    ),
    Case(
        "llama-patterns",
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "gate_proj"],
            rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
            alpha_pattern={"gate_proj": 3, "q_proj": 32},
        ),
    ),
    Case("llama-regex", "llama", dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|down_proj)")),
    Case(
        "llama-layers",
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    ),
    Case("llama-all-linear", "llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    Case(
        "llama-lm-head-saved",
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    ),
    Case("llama-embedding", "llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    Case("gpt2-conv1d", "gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])),
    Case("gpt2-bias-all", "gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="all")),
    Case("gpt2-tied-embedding", "gpt2", dict(r=4, lora_alpha=8, target_modules=["wte", "c_fc"])),
    Case(
        "bert-classifier-saved",
        "bert",
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
    Case("bert-bias-lora-only", "bert", dict(r=4, lora_alpha=8, target_modules=["query"], bias="lora_only")),
    # peftkit's "all-linear" always leaves a classifier head out; HF PEFT does so for SEQ_CLS.
    Case(
        "bert-all-linear", "bert", dict(r=2, lora_alpha=4, target_modules="all-linear", task_type="SEQ_CLS")
    ),
    Case("t5-lora", "t5", dict(r=4, lora_alpha=8, target_modules=["q", "k", "v", "o", "wi"])),
    Case("t5-wo", "t5", dict(r=4, lora_alpha=8, target_modules=["wo"])),
    Case("t5-all-linear", "t5", dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear")),
    Case(
        "plain-torch-conv",
        "mlp-conv",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["emb", "conv1d", "conv2d", "lin1", "lin2"],
            modules_to_save=["head"],
        ),
    ),
]
# HF PEFT saves the whole embedding matrix (``<module>.base_layer.weight``) by default whenever
# ``target_modules`` names ``embed_tokens`` or ``lm_head`` (``save_embedding_layers="auto"``).
HF_SAVES_EMBEDDING_BASE = {"llama-embedding"}


def cases(known_failures: dict[str, pytest.MarkDecorator] | None = None) -> list[Any]:
    """Every case as a pytest param, with the xfail marks of ``known_failures`` (case id → mark)."""
    known_failures = known_failures or {}
    return [
        pytest.param(case, id=case.id, marks=[known_failures[case.id]] if case.id in known_failures else [])
        for case in CASES
    ]


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """HF PEFT and transformers warn about things the cases do on purpose (Conv1D fan_in_fan_out…)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------- helpers
def randomize_trainable(model: nn.Module, seed: int) -> None:
    """Seeded random values for every trainable parameter, in name order (either library)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * RANDOM_SCALE)


def peftkit_model(case: Case, base: nn.Module, seed: int = 1) -> peftkit.PeftModel:
    model = peftkit.wrap(twin(base), case.peftkit_config())
    randomize_trainable(model, seed)
    return model.eval()


def hf_model(case: Case, base: nn.Module, seed: int = 2) -> Any:
    model = peft.get_peft_model(twin(base), case.hf_config())
    randomize_trainable(model, seed)
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, case: Case) -> Tensor:
    """The logits and, for transformers models, the last hidden state, flattened into one vector.

    The hidden state matters for BERT, whose tiny random classifier makes logits of size ~1e-2.
    """
    if case.model == "mlp-conv":
        return output_of(model.eval(), case.tiny.inputs())
    result = model.eval()(**case.tiny.inputs(), output_hidden_states=True)
    hidden = result.decoder_hidden_states if case.tiny.needs_decoder_ids else result.hidden_states
    return torch.cat([result.logits.flatten(), hidden[-1].flatten()])  # (batch·seq·(vocab + dim),)


def assert_same_logits(actual: Tensor, expected: Tensor, base: Tensor) -> None:
    """``actual`` equals ``expected`` within ATOL, and ``expected`` is not just the base model's output."""
    assert (expected - base).abs().max().item() > MIN_EFFECT, "the adapter does not change the logits"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def file_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


def hf_memory_key(disk_key: str, saved_modules: set[str]) -> str:
    """HF PEFT's in-memory parameter name for an on-disk key: the adapter name ``default`` inserted."""
    key = re.sub(r"\.(lora_A|lora_B)\.", r".\1.default.", disk_key)
    key = re.sub(r"\.(lora_embedding_A|lora_embedding_B)$", r".\1.default", key)
    module, param = key.removeprefix("base_model.model.").rsplit(".", 1)
    if module in saved_modules:
        key = f"base_model.model.{module}.modules_to_save.default.{param}"
    return key


def peftkit_targets(model: peftkit.PeftModel) -> set[str]:
    """Names (inside the base model) of the modules peftkit gave a LoRA adapter, read off its file keys."""
    pattern = re.compile(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_embedding_A)")
    return {match[1] for key in model.adapter_state_dict("default") if (match := pattern.fullmatch(key))}


def hf_saved_modules(model: Any) -> set[str]:
    """Names (inside the base model) of the modules HF PEFT keeps a trainable copy of."""
    from peft.utils import ModulesToSaveWrapper

    return {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, ModulesToSaveWrapper)
    }


def hf_targets(model: Any) -> set[str]:
    """Names (inside the base model) of the modules HF PEFT gave a LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def normalized(value: Any) -> Any:
    """Sequences as sets (HF PEFT turns target/saved module lists into sets), dicts as plain dicts."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return set(value)
    if isinstance(value, dict):
        return dict(value)
    return value


# ----------------------------------------------------------------------------- peftkit → HF PEFT
@pytest.mark.parametrize("case", cases())
def test_hf_peft_loads_peftkit_file(case: Case, tmp_path: Path) -> None:
    """(a) peftkit wraps and saves random adapters; HF PEFT loads the file and computes the same logits."""
    base = case.tiny.make()
    base_logits = logits(twin(base), case)
    ours = peftkit_model(case, base)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(twin(base), tmp_path).eval()

    assert hf_targets(theirs) == peftkit_targets(ours)
    assert_same_logits(logits(theirs, case), logits(ours, case), base_logits)


@pytest.mark.parametrize("case", cases())
def test_hf_peft_reads_peftkit_config(case: Case, tmp_path: Path) -> None:
    """peftkit's adapter_config.json gives HF PEFT the LoraConfig it would build from the same fields."""
    base = case.tiny.make()
    peftkit_model(case, base).save_pretrained(tmp_path)
    expected = case.hf_config()
    targeted_by_hf = hf_targets(peft.get_peft_model(twin(base), case.hf_config()))

    loaded = peft.PeftConfig.from_pretrained(tmp_path)

    assert isinstance(loaded, peft.LoraConfig)
    assert loaded.peft_type == peft.PeftType.LORA
    for name in COMPARED_FIELDS:
        if name == "modules_to_save" and expected.task_type == "SEQ_CLS":
            continue  # both libraries add the classifier head themselves; compared by effect in (a)
        assert normalized(getattr(loaded, name)) == normalized(getattr(expected, name)), name
    # "all-linear" is written resolved (HF PEFT resolves it too, then shortens long lists to suffixes):
    # compare what the names select, by HF PEFT's own matching.
    selected = {name for name, _ in base.named_modules() if name and check_target_module_exists(loaded, name)}
    assert selected == targeted_by_hf
    if expected.target_modules != "all-linear":
        assert normalized(loaded.target_modules) == normalized(expected.target_modules)
    text = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(text) <= set(peft.LoraConfig().to_dict()) | {"peft_version"}, "fields HF PEFT does not know"


# ----------------------------------------------------------------------------- HF PEFT → peftkit
@pytest.mark.parametrize(
    "case",
    cases(),
)
def test_peftkit_loads_hf_peft_file(case: Case, tmp_path: Path) -> None:
    """(b) HF PEFT saves random adapters (its defaults); peftkit loads the file, same logits."""
    base = case.tiny.make()
    base_logits = logits(twin(base), case)
    theirs = hf_model(case, base)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.load(twin(base), tmp_path)

    assert peftkit_targets(ours) == hf_targets(theirs)
    assert_same_logits(logits(ours, case), logits(theirs, case), base_logits)


@pytest.mark.parametrize("case", [case for case in CASES if case.id in HF_SAVES_EMBEDDING_BASE], ids=str)
def test_peftkit_loads_hf_peft_embedding_file_without_base_matrix(case: Case, tmp_path: Path) -> None:
    """As (b), with HF PEFT told not to save the embedding matrix: the LoRA part alone loads exactly."""
    base = case.tiny.make()
    base_logits = logits(twin(base), case)
    theirs = hf_model(case, base)
    theirs.save_pretrained(tmp_path, save_embedding_layers=False)

    ours = peftkit.load(twin(base), tmp_path)

    assert_same_logits(logits(ours, case), logits(theirs, case), base_logits)


@pytest.mark.parametrize("case", cases())
def test_peftkit_reads_hf_peft_config(case: Case, tmp_path: Path) -> None:
    """HF PEFT's adapter_config.json gives peftkit the fields it was built from, with no warning."""
    base = case.tiny.make()
    theirs = hf_model(case, base)
    theirs.save_pretrained(tmp_path, save_embedding_layers=False)
    expected = theirs.peft_config["default"]  # "all-linear" resolved by HF PEFT

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "ignoring unknown adapter config fields"
        ours = peftkit.load(twin(base), tmp_path)
    config = ours.peft_config["default"]

    assert isinstance(config, peftkit.LoraConfig)
    for name in (*COMPARED_FIELDS, "target_modules"):
        assert normalized(getattr(config, name)) == normalized(getattr(expected, name)), name


# ----------------------------------------------------------------------------- same tensors, no files
@pytest.mark.parametrize("case", cases())
def test_same_tensors_give_same_logits_in_memory(case: Case) -> None:
    """peftkit's live adapter tensors copied into an HF PEFT model by key: both compute the same logits."""
    base = case.tiny.make()
    base_logits = logits(twin(base), case)
    ours = peftkit_model(case, base)
    theirs = peft.get_peft_model(twin(base), case.hf_config()).eval()
    state = {key: param.detach().clone() for key, param in ours.adapter_state_dict("default").items()}

    result = set_peft_model_state_dict(theirs, state)

    assert result.unexpected_keys == []
    hf_params = dict(theirs.named_parameters())
    saved = hf_saved_modules(theirs)
    for key, value in state.items():
        torch.testing.assert_close(hf_params[hf_memory_key(key, saved)].detach(), value, atol=0, rtol=0)
    assert_same_logits(logits(ours, case), logits(theirs, case), base_logits)


@pytest.mark.parametrize("case", cases())
def test_files_have_same_keys_and_shapes(case: Case, tmp_path: Path) -> None:
    """The adapter file each library writes for the same adapter: same keys, same shapes, fp32.

    HF PEFT is asked not to add the embedding matrix it saves by default for embed_tokens/lm_head
    targets (see ``test_peftkit_loads_hf_peft_file``); that extra key is checked to be the only one.
    """
    base = case.tiny.make()
    peftkit_model(case, base).save_pretrained(tmp_path / "peftkit")
    theirs = hf_model(case, base)
    theirs.save_pretrained(tmp_path / "hf", save_embedding_layers=False)
    theirs.save_pretrained(tmp_path / "hf-default")

    ours_shapes, hf_shapes = file_shapes(tmp_path / "peftkit"), file_shapes(tmp_path / "hf")
    assert sorted(ours_shapes) == sorted(hf_shapes)
    assert ours_shapes == hf_shapes
    extra = set(file_shapes(tmp_path / "hf-default")) - set(hf_shapes)
    assert all(key.endswith(".base_layer.weight") for key in extra)
    assert bool(extra) == (case.id in HF_SAVES_EMBEDDING_BASE)
    with safe_open(str(tmp_path / "peftkit" / "adapter_model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.float32}  # noqa: SIM118
