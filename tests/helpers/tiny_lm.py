"""A tiny causal language model with its own tiny tokenizer, built offline in a second.

The tokenizer is a byte-level BPE (a few hundred tokens) trained on the bundled person-json task, with
a ChatML chat template like SmolLM2's; the model is a 2-layer Llama sized to that vocabulary, so a
training step takes milliseconds. ``plain=True`` gives a tokenizer without a chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from peftkit.training.tasks import BUILTIN_TASKS

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(plain: bool = False, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on the person-json rows (ChatML template unless ``plain``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    task = BUILTIN_TASKS["person-json"]
    texts = []
    for path in (task.train, task.validation):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts += [row["prompt"], row["completion"]]
    texts.append(task.settings["prompt_template"] + " user assistant system You are tiny.")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.model_max_length = 512
    if not plain:
        tokenizer.chat_template = CHATML
    return tokenizer


def build_model(vocab_size: int, seed: int = 0, hidden: int = 32):
    """A 2-layer Llama with seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def save_tiny_lm(directory: Path, plain: bool = False, seed: int = 0, hidden: int = 32) -> Path:
    """Write a tiny model and tokenizer to ``directory`` (loadable by ``peftkit.models.load_model``).

    ``hidden=128`` for quantized tests: bitsandbytes quantizes in blocks of 64 values.
    """
    tokenizer = build_tokenizer(plain=plain)
    model = build_model(len(tokenizer), seed=seed, hidden=hidden)
    model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_llama_config():
    """The 2-layer Llama config the memory-estimate tests use (vocabulary 300, GQA 4:2)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=128,
    )


def llama_70b_config():
    """Llama-3-70B's shapes, for estimates on the meta device (no weights are made)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )


def save_tiny_classifier(directory: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """Write a tiny 2-layer Llama sequence classifier (its ``score`` head: ``num_labels`` outputs, as
    its config says) and the tiny tokenizer to ``directory``."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
