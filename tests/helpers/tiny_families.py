"""Tiny random models of each architecture peftkit exports to GGUF, each with a tokenizer of its family's
kind and a chat template of its family's format, saved as a transformers directory in a second.

Tokenizers (trained on the bundled person-json rows, a few hundred tokens):
- byte-level BPE: GPT-2 splitting (Llama), Llama 3 splitting (a Llama 3.1-style Llama, with its RoPE
  scaling), Qwen2's class
  (Qwen2, Qwen3);
- SentencePiece-style BPE with byte fallback: Gemma's class (Gemma 2, Gemma 3), Llama's class
  (Mistral, Phi-3).
Weights are drawn with a large spread (``initializer_range``) so attention is sharp and a wrong RoPE
layout, norm or scale changes the greedy tokens, not only the fourth decimal.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftkit.training.tasks import BUILTIN_TASKS

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 2, 4, 2, 16

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
    "{% for message in turns %}{% if message['role'] == 'user' %}{% if loop.last and system is defined %}"
    "{{ '[INST] ' + system + '\n\n' + message['content'] + '[/INST]' }}{% else %}"
    "{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}{% else %}"
    "{{ ' ' + message['content'] | trim + eos_token }}{% endif %}{% endfor %}"
)
# Llama 3.1's RoPE scaling (llama.cpp needs it as a rope_freqs tensor), with a short original context so
# most of a tiny head's frequencies are scaled
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# Phi-3's added tokens (llama.cpp looks for <|endoftext|> once <|end|> is there)
PHI3_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _texts() -> list[str]:
    task = BUILTIN_TASKS["person-json"]
    texts = []
    for path in (task.train, task.validation):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts += [row["prompt"], row["completion"]]
    return [
        *texts,
        task.settings["prompt_template"],
        "The capital of France is Paris. List three colours: red,",
    ]


def _byte_level(specials: list[str], splitter: str, vocab_size: int = 500) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer``, GPT-2 (``"gpt2"``) or Llama 3 (``"llama3"``) splitting."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    if splitter == "gpt2":
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_texts(), trainer=trainer)
    return bpe


def _vocab_and_merges(bpe: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
    spec = json.loads(bpe.to_str())
    return spec["model"]["vocab"], [tuple(m) for m in spec["model"]["merges"]]


def _sentencepiece_vocab(
    specials: list[str], vocab_size: int = 500
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a SentencePiece-style BPE: specials, the 256 byte tokens, then merges of
    "▁"-joined text."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    bpe = Tokenizer(models.BPE(byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.train_from_iterator(_texts(), trainer=trainers.BpeTrainer(vocab_size=vocab_size))
    learned, merges = _vocab_and_merges(bpe)
    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token in sorted(learned, key=learned.get):
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def chatml_tokenizer() -> Any:
    """Qwen2's tokenizer class (its splitting, NFC) on a tiny byte-level vocabulary, ChatML template."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab, merges = _vocab_and_merges(_byte_level(specials, "gpt2"))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def byte_level_tokenizer(splitter: str) -> Any:
    """GPT-2 (ChatML template) or Llama 3 splitting (Llama 3 template) in a plain fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    if splitter == "gpt2":
        specials, bos, eos, template = (
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            None,
            "<|im_end|>",
            CHATML,
        )
    else:
        specials = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ]
        bos, eos, template = "<|begin_of_text|>", "<|eot_id|>", LLAMA3
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level(specials, splitter), eos_token=eos, bos_token=bos
    )
    tokenizer.chat_template = template
    return tokenizer


def gemma_tokenizer() -> Any:
    """Gemma's tokenizer class on a tiny SentencePiece-style vocabulary, Gemma template."""
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    vocab, merges = _sentencepiece_vocab(specials)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = GEMMA
    return tokenizer


def llama_sp_tokenizer(template: str, extra: list[str]) -> Any:
    """Llama's (SentencePiece-style) tokenizer class on a tiny vocabulary: Mistral's and Phi-3's kind."""
    from transformers import LlamaTokenizer

    vocab, merges = _sentencepiece_vocab(["<unk>", "<s>", "</s>", *extra])
    tokenizer = LlamaTokenizer(
        vocab=vocab, merges=merges, legacy=True
    )  # SentencePiece's (llama.cpp's) spacing
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.chat_template = template
    return tokenizer


def _config(name: str, vocab_size: int, tokenizer: Any) -> Any:
    import transformers as tf

    common = dict(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        initializer_range=0.25,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    gemma = dict(head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=512)
    configs: dict[str, Callable[[], Any]] = {
        "llama": lambda: tf.LlamaConfig(**common, tie_word_embeddings=True),
        "llama3": lambda: tf.LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=HEAD_DIM, tie_word_embeddings=False),
        "gemma2": lambda: tf.Gemma2Config(**common, **gemma),
        "gemma3": lambda: tf.Gemma3TextConfig(**common, **gemma),
        "phi3": lambda: tf.Phi3Config(**common, sliding_window=None),
    }
    return configs[name]()


@dataclass(frozen=True)
class Family:
    """One tiny model kind: its name (test id), model class and tokenizer builder."""

    name: str
    model_class: str
    tokenizer: Callable[[], Any]


FAMILIES = (
    Family("llama", "LlamaForCausalLM", lambda: byte_level_tokenizer("gpt2")),
    Family("llama3", "LlamaForCausalLM", lambda: byte_level_tokenizer("llama3")),
    Family("mistral", "MistralForCausalLM", lambda: llama_sp_tokenizer(MISTRAL, [])),
    Family("qwen2", "Qwen2ForCausalLM", chatml_tokenizer),
    Family("qwen3", "Qwen3ForCausalLM", chatml_tokenizer),
    Family("gemma2", "Gemma2ForCausalLM", gemma_tokenizer),
    Family("gemma3", "Gemma3ForCausalLM", gemma_tokenizer),
    Family("phi3", "Phi3ForCausalLM", lambda: llama_sp_tokenizer(PHI3, PHI3_TOKENS)),
)


def save_family(family: Family, directory: Path, seed: int = 0) -> Path:
    """Write ``family``'s tiny model and tokenizer to ``directory`` (loadable by ``load_model``)."""
    import transformers

    tokenizer = family.tokenizer()
    torch.manual_seed(seed)
    config = _config(family.name, len(tokenizer), tokenizer)
    model = getattr(transformers, family.model_class)(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_random_lora(model_dir: Path, directory: Path, seed: int = 0, **options: Any) -> Path:
    """A random (non-zero B) LoRA adapter for the model in ``model_dir``, saved to ``directory``."""
    import peftkit
    from peftkit.models import load_model

    base, _ = load_model(str(model_dir))
    torch.manual_seed(seed)
    settings = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    wrapped = peftkit.wrap(base, peftkit.LoraConfig(**{**settings, **options}))
    wrapped.save_pretrained(directory)
    return directory
