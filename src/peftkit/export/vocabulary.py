"""The tokenizer as llama.cpp reads it from a GGUF file: tokens, their types, merges or scores, the special
ids, whether BOS/EOS are added, the pre-tokenizer type and the chat template.

Two kinds of tokenizer are written, read from the fast tokenizer's own ``tokenizer.json``:

- byte-level BPE (SmolLM2, Llama 3, Qwen): ``tokenizer.ggml.model = "gpt2"`` with the merges and the
  pre-tokenizer type (``tokenizer.ggml.pre``). The type is recognised from the pre-tokenizer itself
  (its splitting rules), not from a hash of a vocabulary's output as llama.cpp's converter does, so a
  fine-tuned or tiny vocabulary with a known pre-tokenizer is recognised too.
- SentencePiece-style BPE with byte fallback (Gemma, Phi-3, Mistral, Llama 2): ``"llama"`` with one
  score per token, ``-rank`` of the merge that makes it, so llama.cpp's SentencePiece merges pairs in
  the order the Hugging Face merges would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gguf

from peftkit.foundation.errors import UsageError

__all__ = ["Vocabulary", "pre_tokenizer_type", "read_vocabulary"]

_GPT2_REGEX_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# llama.cpp's pre-tokenizer names for the regular expressions that split text before BPE
_REGEX_TYPES = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}
_SPACE = "▁"


@dataclass(frozen=True)
class Vocabulary:
    """What :func:`read_vocabulary` found, ready to write.

    Attributes:
        model: ``"gpt2"`` (byte-level BPE) or ``"llama"`` (SentencePiece-style).
        pre: the pre-tokenizer type (``"gpt-2"``, ``"smollm"``, ``"llama-bpe"``, ``"qwen2"``; ``"default"``
            for ``"llama"``).
        tokens: one string per embedding row (rows past the tokenizer padded with ``[PAD<i>]``).
        token_types: gguf.TokenType per token.
        merges: ``"left right"`` per BPE merge (``"gpt2"`` only).
        scores: one float per token (``"llama"`` only).
        special_ids: ``"bos"``, ``"eos"``, ``"unk"``, ``"pad"`` → id, where the tokenizer has them.
        add_bos, add_eos: whether encoding text adds them (what Hugging Face's tokenizer does).
        add_space_prefix: ``"llama"``: whether a space is put before the text (Llama 2, Phi-3; not Gemma).
        chat_template: the Jinja chat template, or None.
        caveats: where llama.cpp will tokenize differently from the Hugging Face tokenizer (said to the user).
    """

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    caveats: tuple[str, ...] = ()

    def write(self, writer: gguf.GGUFWriter) -> None:
        """Add the ``tokenizer.*`` keys to ``writer``."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.model == "gpt2":
            writer.add_token_merges(self.merges)
        else:
            writer.add_token_scores(self.scores)
            writer.add_add_space_prefix(self.add_space_prefix)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_vocabulary(tokenizer: Any, vocab_size: int) -> Vocabulary:
    """The GGUF vocabulary of a Hugging Face fast tokenizer for a model with ``vocab_size`` embedding rows.

    Raises:
        UsageError: a slow tokenizer, more tokens than embedding rows, or a tokenizer llama.cpp cannot
            reproduce (not BPE, or an unknown pre-tokenizer).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UsageError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; GGUF export reads tokenizer.json"
        )
    spec = json.loads(backend.to_str())
    pieces = tokenizer.get_vocab()  # token string → id, added tokens included
    if max(pieces.values()) >= vocab_size:
        raise UsageError(
            f"the tokenizer has ids up to {max(pieces.values())}, the model only {vocab_size} rows"
        )
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UsageError(
            f"the tokenizer is {model.get('type')}, not BPE; llama.cpp export supports BPE tokenizers"
        )
    sentencepiece = bool(model.get("byte_fallback"))
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    by_id = {token_id: text for text, token_id in pieces.items()}
    tokens, types = _tokens_and_types(by_id, added, vocab_size, sentencepiece, tokenizer.unk_token_id)
    merges = [_merge_text(merge) for merge in model.get("merges", [])]
    add_bos, add_eos = _added_specials(tokenizer)
    return Vocabulary(
        model="llama" if sentencepiece else "gpt2",
        pre="default" if sentencepiece else pre_tokenizer_type(spec),
        tokens=tokens,
        token_types=types,
        merges=[] if sentencepiece else merges,
        scores=_merge_scores(tokens, merges) if sentencepiece else [],
        special_ids=_special_ids(tokenizer),
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=sentencepiece and _adds_space_prefix(spec),
        chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
        caveats=_caveats(spec) if sentencepiece else (),
    )


def pre_tokenizer_type(spec: dict[str, Any]) -> str:
    """llama.cpp's name for how a byte-level BPE ``tokenizer.json`` splits text before merging.

    Raises:
        UsageError: a pre-tokenizer llama.cpp has no equivalent for (peftkit knows of).
    """
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if len(parts) == 1 and _is(parts[0], _GPT2_REGEX_SPLIT):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and _is(parts[1], _GPT2_REGEX_SPLIT)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = parts[0].get("pattern", {}).get("Regex")
        if regex in _REGEX_TYPES and parts[0].get("behavior") == "Isolated":
            return _REGEX_TYPES[regex]
    raise UsageError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) has no llama.cpp equivalent peftkit knows "
        "(GPT-2, SmolLM, Llama 3, Qwen2 splitting)"
    )


def _is(part: dict[str, Any], expected: dict[str, Any]) -> bool:
    return all(part.get(key) == value for key, value in expected.items())


def _tokens_and_types(
    by_id: dict[int, str],
    added: dict[int, dict[str, Any]],
    size: int,
    sentencepiece: bool,
    unk_id: int | None,
) -> tuple[list[str], list[int]]:
    tokens, types = [], []
    for token_id in range(size):
        text = by_id.get(token_id)
        if text is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif sentencepiece and token_id == unk_id:
            tokens.append(text)
            types.append(gguf.TokenType.UNKNOWN)
        elif token_id in added:
            special = added[token_id].get("special") or (text.startswith("<|") and text.endswith("|>"))
            tokens.append(text if special or not sentencepiece else text.replace(_SPACE, " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif sentencepiece and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens.append(text)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _merge_text(merge: str | list[str]) -> str:
    """A merge as llama.cpp reads it: ``"left right"``, spaces inside a part written as U+0120 + 256."""
    if isinstance(merge, str):
        return merge
    return " ".join(part.replace(" ", chr(ord(" ") + 256)) for part in merge)


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """``-rank`` of the first merge that produces each token; 0 for the rest (single symbols, specials)."""
    rank_of: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        rank_of.setdefault(left + right, rank)
    return [-float(rank_of[token]) if token in rank_of else 0.0 for token in tokens]


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int):
            ids[kind] = token_id
    return ids


def _added_specials(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS before and EOS after encoded text (probed, as it behaves)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """SentencePiece-style tokenizers that put "▁" before the text (Llama 2's Prepend, Metaspace "first")."""
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer])
    if any(step.get("type") == "Prepend" and step.get("prepend") == _SPACE for step in steps):
        return True
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in parts)


def _caveats(spec: dict[str, Any]) -> tuple[str, ...]:
    """SentencePiece-style differences llama.cpp cannot be told about.

    llama.cpp puts "▁" before the text after every special token, as SentencePiece does and Hugging Face's
    Metaspace ``prepend_scheme="first"`` (transformers' ``legacy=False``) does not.
    """
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    if any(p.get("type") == "Metaspace" and p.get("prepend_scheme") == "first" for p in parts):
        return (
            "this tokenizer (legacy=False) puts no space after special tokens; llama.cpp does, so text right "
            "after a special token (chat turns) tokenizes differently there",
        )
    return ()
