"""The tokenizer in the GGUF: llama.cpp's tokenizer gives the Hugging Face tokenizer's ids, for every kind
of tokenizer the tiny families use and for SmolLM2's, on text with digits, spaces, newlines, accents,
emoji and special tokens."""

from __future__ import annotations

import json

import gguf
import pytest

from peftkit.export.gguf_export import export
from peftkit.export.vocabulary import pre_tokenizer_type, read_vocabulary
from peftkit.foundation.errors import UsageError
from peftkit.models import load_model

from helpers.llama_cpp_run import open_llama, require_llama_cpp
from helpers.tiny_families import FAMILIES, save_family

TEXTS = (
    "Ada Park, 36, has worked as a surgeon in Toronto for ten years.",
    "Two  spaces,  a newline\n\nand 12345 and 3.14",
    "Café déjà vu — naïve 🚀 emoji",
    "I've been 'told' he's there; WE'LL see",
)


def _chat(tokenizer) -> str:
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_llama_cpp_tokenizes_as_the_hugging_face_tokenizer(family, tmp_path) -> None:
    require_llama_cpp()
    model_dir = save_family(family, tmp_path / "model")
    export(model_dir, tmp_path / "model.gguf", outtype="f32")
    _, tokenizer = load_model(str(model_dir))
    llm = open_llama(tmp_path / "model.gguf", vocab_only=True)
    try:
        for text in (*TEXTS, _chat(tokenizer)):
            expected = tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token or "\0"))
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == expected["input_ids"], text
    finally:
        llm.close()


@pytest.mark.slow
def test_smollm2_tokenizes_alike_in_llama_cpp(tmp_path) -> None:
    """SmolLM2's converted tokenizer splits like GPT-2 (its GGUF says "smollm", which splits digits one by
    one; the vocabulary has no multi-digit tokens, so both give the same ids)."""
    require_llama_cpp()
    model, tokenizer = load_model()
    vocabulary = read_vocabulary(tokenizer, model.config.vocab_size)
    assert (vocabulary.model, vocabulary.pre, vocabulary.add_bos) == ("gpt2", "gpt-2", False)
    export("smollm2-135m-instruct", tmp_path / "smollm2.gguf", outtype="q8_0")
    llm = open_llama(tmp_path / "smollm2.gguf", vocab_only=True)
    try:
        for text in (*TEXTS, _chat(tokenizer)):
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], (
                text
            )
    finally:
        llm.close()


def _pre(parts: list[dict]) -> dict:
    return {"pre_tokenizer": parts[0] if len(parts) == 1 else {"type": "Sequence", "pretokenizers": parts}}


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def test_pre_tokenizer_types_are_recognised_by_their_rules() -> None:
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_type(_pre([BYTE_LEVEL])) == "gpt-2"
    assert pre_tokenizer_type(_pre([digits, BYTE_LEVEL])) == "smollm"
    by_name = {family.name: family for family in FAMILIES}
    qwen = json.loads(by_name["qwen2"].tokenizer().backend_tokenizer.to_str())
    assert pre_tokenizer_type(qwen) == "qwen2"
    llama3 = json.loads(by_name["llama3"].tokenizer().backend_tokenizer.to_str())
    assert pre_tokenizer_type(llama3) == "llama-bpe"


@pytest.mark.parametrize(
    "parts",
    [
        [{**BYTE_LEVEL, "add_prefix_space": True}],
        [{"type": "Whitespace"}],
        [
            {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated"},
            {**BYTE_LEVEL, "use_regex": False},
        ],
    ],
)
def test_unknown_pre_tokenizers_are_refused_in_one_line(parts) -> None:
    with pytest.raises(UsageError, match=r"no llama\.cpp equivalent") as error:
        pre_tokenizer_type(_pre(parts))
    assert "\n" not in str(error.value)


def test_sentencepiece_scores_order_tokens_as_the_merges() -> None:
    tokenizer = next(f for f in FAMILIES if f.name == "gemma2").tokenizer()
    vocabulary = read_vocabulary(tokenizer, len(tokenizer))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert vocabulary.model == "llama" and not vocabulary.add_space_prefix  # Gemma puts no space first
    for rank in (0, 1, len(merges) // 2, len(merges) - 1):
        left, right = merges[rank]
        first = next(r for r, (a, b) in enumerate(merges) if a + b == left + right)
        assert vocabulary.scores[tokenizer.convert_tokens_to_ids(left + right)] == -first
    types = dict(zip(vocabulary.tokens, vocabulary.token_types, strict=True))
    assert types["<0x41>"] == gguf.TokenType.BYTE
    assert types["<unk>"] == gguf.TokenType.UNKNOWN
    assert types["<start_of_turn>"] == gguf.TokenType.CONTROL


def test_rows_past_the_tokenizer_are_padding_and_fewer_rows_are_refused() -> None:
    tokenizer = FAMILIES[0].tokenizer()
    vocabulary = read_vocabulary(tokenizer, len(tokenizer) + 3)
    assert vocabulary.tokens[-1] == f"[PAD{len(tokenizer) + 2}]"
    assert vocabulary.token_types[-3:] == [gguf.TokenType.UNUSED] * 3
    with pytest.raises(UsageError, match="rows"):
        read_vocabulary(tokenizer, len(tokenizer) - 1)


def test_a_tokenizer_llama_cpp_spaces_differently_is_said() -> None:
    from transformers import LlamaTokenizer

    from helpers.tiny_families import _sentencepiece_vocab

    vocab, merges = _sentencepiece_vocab(["<unk>", "<s>", "</s>"])
    first = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False)
    assert "special tokens" in read_vocabulary(first, len(first)).caveats[0]
    always = LlamaTokenizer(vocab=vocab, merges=merges, legacy=True)
    assert read_vocabulary(always, len(always)).caveats == ()
