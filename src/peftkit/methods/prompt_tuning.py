"""Prompt tuning: ``n`` trainable vectors prepended to the input embeddings; the model stays frozen.

Lester, Al-Rfou and Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning" (2021),
arXiv:2104.08691.

The virtual tokens start random (``N(0, 1)``, as ``nn.Embedding``), as rows of the model's embedding
matrix for random vocabulary ids (``"SAMPLE_VOCAB"``), or as the embeddings of a text such as
``"Summarize the dialogue:"`` repeated or cut to ``n`` tokens (``"TEXT"``, which needs a tokenizer).
Saved as ``prompt_embeddings`` (total_virtual_tokens, token_dim), as Hugging Face PEFT saves it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from peftkit.methods.soft_prompt import InputPromptAdapter, SoftPromptConfig

INIT_MODES = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass(frozen=True)
class PromptTuningConfig(SoftPromptConfig):
    """Prompt-tuning settings; field names and defaults are Hugging Face PEFT's.

    Args:
        prompt_tuning_init: ``"RANDOM"``, ``"SAMPLE_VOCAB"`` or ``"TEXT"``.
        prompt_tuning_init_text: the text for ``"TEXT"``.
        tokenizer_name_or_path: a tokenizer to load with ``AutoTokenizer`` for ``"TEXT"``.
        tokenizer_kwargs: extra arguments for ``AutoTokenizer.from_pretrained``.
        tokenizer: a tokenizer object to use instead of loading one (not saved; its ``name_or_path`` is).
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: Mapping[str, Any] | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_tuning_init not in INIT_MODES:
            raise ValueError(
                f"PromptTuningConfig.prompt_tuning_init={self.prompt_tuning_init!r} must be one of "
                f"{list(INIT_MODES)}"
            )
        if self.prompt_tuning_init == "TEXT" and not self.inference_mode:
            if not self.prompt_tuning_init_text:
                raise ValueError('prompt_tuning_init="TEXT" needs prompt_tuning_init_text, e.g. "Summarize:"')
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ValueError(
                    'prompt_tuning_init="TEXT" needs a tokenizer: pass tokenizer=<tokenizer object> or '
                    "tokenizer_name_or_path=<hub id or directory>"
                )

    def to_dict(self) -> dict[str, Any]:
        """HF PEFT's fields; a tokenizer object is recorded by its ``name_or_path``."""
        data = super().to_dict()
        tokenizer = data.pop("tokenizer")
        if data["tokenizer_name_or_path"] is None and tokenizer is not None:
            data["tokenizer_name_or_path"] = getattr(tokenizer, "name_or_path", None) or None
        return data

    def build_model_adapter(self, model: nn.Module) -> PromptEmbedding:
        """The prompt for ``model`` (initialised unless ``inference_mode``: a file will fill it)."""
        return PromptEmbedding(self, model)


class PromptEmbedding(InputPromptAdapter):
    """The virtual tokens: ``embedding.weight`` (total_virtual_tokens, token_dim), trained directly.

    Args:
        config: a resolved :class:`PromptTuningConfig` (sizes filled in).
        model: the base model, for the vocabulary-based initialisations.

    Raises:
        ValueError: the model's embedding width differs from ``token_dim``, or the text tokenizes to nothing.
    """

    def __init__(self, config: PromptTuningConfig, model: nn.Module) -> None:
        super().__init__(config)
        self.embedding = nn.Embedding(config.total_virtual_tokens, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return
        words = model.get_input_embeddings().weight  # (vocab, dim)
        if words.shape[1] != config.token_dim:
            raise ValueError(
                f"prompt_tuning_init={config.prompt_tuning_init!r} copies rows of the model's embeddings of "
                f"width {words.shape[1]}, but token_dim={config.token_dim}; leave token_dim unset"
            )
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, words.shape[0], (config.total_virtual_tokens,))
        else:
            ids = torch.tensor(text_token_ids(config, config.total_virtual_tokens))
        with torch.no_grad():
            self.embedding.weight.copy_(words.detach()[ids.to(words.device)].float())

    def virtual_tokens(self) -> Tensor:
        return self.embedding.weight

    def prompt_embeddings_to_save(self) -> Tensor:
        return self.embedding.weight  # the parameter itself: loading a file copies into it


def text_token_ids(config: PromptTuningConfig, count: int) -> list[int]:
    """The token ids of ``prompt_tuning_init_text``, repeated and cut to exactly ``count``.

    Raises:
        ValueError: the text gives no tokens.
    """
    tokenizer = config.tokenizer
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {})
        )
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenizes to no tokens")
    return (ids * math.ceil(count / len(ids)))[:count]
