"""Prefix tuning: trainable keys and values prepended to every attention layer, through the KV cache.

Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (2021), arXiv:2101.00190.

Each layer attends to ``n`` extra positions whose keys and values are learned. They reach the model as
a transformers ``DynamicCache`` already holding ``n`` positions, so every cache-aware model (Llama,
GPT-2, BERT, T5…) needs no change: positions start at ``n``, and the attention mask gets ``n`` ones in
front. With grouped-query attention the prefix has the key/value heads' width
(``token_dim = head_dim · num_key_value_heads``). On an encoder-decoder model the prefixes go to the
decoder's self-attention layers (the encoder and cross-attention are unchanged, as in HF PEFT).

``prefix_projection=True`` trains an MLP (Linear-Tanh-Linear) over an (n, token_dim) embedding instead
of the prefixes directly; only its output is saved, and reloads as the plain (n, num_layers·2·token_dim)
embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from peftkit.methods.soft_prompt import (
    SoftPromptAdapter,
    SoftPromptConfig,
    as_keywords,
    expanded_batch,
    is_encoder_decoder,
    model_text_config,
    ones_before,
    refuse_user_cache,
)

INIT_WEIGHTS = (None, "zero")


@dataclass(frozen=True)
class PrefixTuningConfig(SoftPromptConfig):
    """Prefix-tuning settings; field names and defaults are Hugging Face PEFT's.

    Args:
        prefix_projection: train the prefixes through an MLP (reparameterization) instead of directly.
        encoder_hidden_size: that MLP's width; default ``token_dim``.
        init_weights: ``None`` (random, ``N(0, 1)``) or ``"zero"`` (zero prefixes; the last MLP layer
            zero with ``prefix_projection``).
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"PrefixTuningConfig.init_weights={self.init_weights!r} must be None or 'zero'")

    def resolve(self, model: nn.Module) -> PrefixTuningConfig:
        """Sizes from the model; under grouped-query attention, the key/value heads' (HF PEFT's rule)."""
        config = self
        model_config = model_text_config(model)
        kv_heads = getattr(model_config, "num_key_value_heads", None)
        if self.token_dim is None and self.num_attention_heads is None and isinstance(kv_heads, int):
            resolved = super().resolve(model)
            head_dim = (
                getattr(model_config, "head_dim", None) or resolved.token_dim // resolved.num_attention_heads
            )
            config = self.replace(token_dim=head_dim * kv_heads, num_attention_heads=kv_heads)
        config = SoftPromptConfig.resolve(config, model)
        if config.encoder_hidden_size is None:
            config = config.replace(encoder_hidden_size=config.token_dim)
        if config.token_dim % config.num_attention_heads:
            raise ValueError(
                f"PrefixTuningConfig.token_dim={config.token_dim} is not divisible by "
                f"num_attention_heads={config.num_attention_heads}"
            )
        return config  # type: ignore[return-value]

    def build_model_adapter(self, model: nn.Module) -> PrefixEncoder:
        """The prefixes (or, with ``inference_mode``, the plain embedding a saved adapter loads into)."""
        return PrefixEncoder(self)


class PrefixEncoder(SoftPromptAdapter):
    """The prefixes of every layer, flattened: (num_virtual_tokens, num_layers · 2 · token_dim).

    Row ``t`` holds, per layer ``l``, the key then the value of virtual position ``t``; each is
    (num_attention_heads, head_dim) flattened (Hugging Face PEFT's layout).

    Args:
        config: a resolved :class:`PrefixTuningConfig`.
    """

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__(config)
        n, dim = config.num_virtual_tokens, config.token_dim
        width = config.num_layers * 2 * dim
        self.transform: nn.Sequential | None = None
        if config.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(n, dim)
            hidden = config.encoder_hidden_size
            self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def prefix_states(self) -> Tensor:
        """(num_virtual_tokens, num_layers · 2 · token_dim), differentiable."""
        if self.transform is None:
            return self.embedding.weight
        return self.transform(self.embedding.weight)

    def prompt_embeddings_to_save(self) -> Tensor:
        if self.transform is None:
            return self.embedding.weight  # the parameter itself: loading a file copies into it
        return self.prefix_states().detach()

    def cache(self, model: nn.Module, batch: int) -> Any:
        """A transformers cache holding the prefixes of every layer for ``batch`` rows.

        Returns:
            ``DynamicCache`` with per layer keys and values of shape (batch, heads, n, head_dim), in the
            model's dtype; for an encoder-decoder model an ``EncoderDecoderCache`` with those as the
            self-attention cache and an empty cross-attention cache.
        """
        from transformers import DynamicCache, EncoderDecoderCache

        config = self.config
        n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
        dtype = model.get_input_embeddings().weight.dtype
        states = self.prefix_states().to(dtype)  # (n, layers·2·dim)
        states = states.view(n, layers * 2, heads, config.token_dim // heads).permute(1, 2, 0, 3)
        states = states.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (layers·2, batch, heads, n, head_dim)
        cache = DynamicCache([(states[2 * i], states[2 * i + 1]) for i in range(layers)])
        return EncoderDecoderCache(cache, DynamicCache()) if is_encoder_decoder(model) else cache

    def prepare_inputs(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The prefixes as ``past_key_values``; the (decoder's) attention mask and positions shifted by n.

        Raises:
            ValueError: gradient checkpointing is on while training (recomputed blocks would write the
                prefixes into the cache twice), or a filled ``past_key_values`` is passed.
        """
        kwargs = as_keywords(args, kwargs)
        refuse_user_cache(kwargs, "PREFIX_TUNING")
        if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            raise ValueError(
                "prefix tuning does not work with gradient checkpointing (the prefixes live in the KV cache, "
                "which recomputation would fill twice); turn gradient checkpointing off"
            )
        reference = kwargs.get("input_ids")
        if reference is None:
            reference = kwargs.get("inputs_embeds")
        if reference is None:
            raise ValueError("PREFIX_TUNING forward needs input_ids or inputs_embeds")
        kwargs["past_key_values"] = self.cache(model, reference.shape[0])
        return (), self._shift(model, kwargs)

    def prepare_generate(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``generate`` starts from a cache holding the prefixes (one copy per beam / returned sequence)."""
        kwargs = as_keywords(args, kwargs)
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("generate() with a PREFIX_TUNING adapter needs input_ids")
        refuse_user_cache(kwargs, "PREFIX_TUNING")
        kwargs["past_key_values"] = self.cache(model, expanded_batch(model, input_ids.shape[0], kwargs))
        if not is_encoder_decoder(model) and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        return (), self._shift(model, kwargs)

    def _shift(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The mask of the sequence the prefixes join gets n ones in front; its positions move by n."""
        n = self.config.num_virtual_tokens
        mask_key = "decoder_attention_mask" if is_encoder_decoder(model) else "attention_mask"
        if kwargs.get(mask_key) is not None:
            kwargs[mask_key] = ones_before(kwargs[mask_key], n)
        positions_key = "decoder_position_ids" if is_encoder_decoder(model) else "position_ids"
        if kwargs.get(positions_key) is not None:
            kwargs[positions_key] = kwargs[positions_key] + n
        return kwargs
