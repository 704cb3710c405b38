"""What the soft-prompt methods share: their config fields, and virtual tokens at the model's inputs.

Prompt tuning and P-tuning prepend ``n`` learned vectors to the input embeddings; prefix tuning prepends
``n`` learned keys and values to every attention layer's KV cache. Either way the model sees ``n`` more
positions than the caller passed, so the attention mask, position ids, token type ids and per-token
labels (``-100`` on virtual positions: no loss there) are lengthened to match, here in one place.

Field names and defaults are Hugging Face PEFT's (``PromptLearningConfig``); the sizes left unset are
read from the model's config when the adapter is added, as HF PEFT does, and saved filled in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.adapter_config import AdapterConfig
from peftkit.foundation.tasks import IGNORE_INDEX

# AdapterConfig fields that choose modules; soft prompts choose none, and HF PEFT's prompt configs lack them.
TARGETING_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
PER_TOKEN_TASKS = ("CAUSAL_LM", "TOKEN_CLS")


@dataclass(frozen=True)
class SoftPromptConfig(AdapterConfig):
    """Fields every soft-prompt method has (Hugging Face PEFT's ``PromptLearningConfig``).

    Args:
        num_virtual_tokens: how many virtual tokens (required), e.g. 8–32.
        token_dim: their width; default the model's hidden size.
        num_transformer_submodules: 2 for ``task_type="SEQ_2_SEQ_LM"`` (rows are saved for encoder and
            decoder; the encoder's are used, as in HF PEFT), else 1.
        num_attention_heads: default the model's (prefix tuning: its key/value heads).
        num_layers: default the model's number of layers.
    """

    peft_type: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False  # virtual tokens are extra inputs, not a change of weights
    #: The file key HF PEFT stores the virtual tokens under (no ``base_model.model.`` prefix).
    file_key: ClassVar[str] = "prompt_embeddings"

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(
                f"{name}.num_virtual_tokens={self.num_virtual_tokens!r} must be a positive integer "
                "(8–32 is typical)"
            )
        for field_name in TARGETING_FIELDS:
            if getattr(self, field_name) is not None:
                raise ValueError(
                    f"{name}.{field_name} does not apply: soft prompts act on the model's inputs, not on "
                    "chosen modules; leave it unset"
                )
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"{name}.num_transformer_submodules={self.num_transformer_submodules!r} must be 1 or 2"
            )

    def to_dict(self) -> dict[str, Any]:
        """HF PEFT's fields only: its prompt configs have no targeting fields."""
        data = super().to_dict()
        for field_name in TARGETING_FIELDS:
            data.pop(field_name)
        return data

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the saved ``prompt_embeddings``: ``num_virtual_tokens · num_transformer_submodules``."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    def resolve(self, model: nn.Module) -> SoftPromptConfig:
        """A copy with every size filled in from ``model.config`` (HF PEFT's rules).

        Raises:
            TypeError: ``model`` cannot take virtual tokens (no ``get_input_embeddings``: not a
                transformers model).
            ValueError: a size is unset and the model has no config to read it from.
        """
        if not callable(getattr(model, "get_input_embeddings", None)):
            raise TypeError(
                f"{type(self).__name__} needs a transformers model (one with get_input_embeddings() whose "
                f"forward takes inputs_embeds / past_key_values); {type(model).__name__} is not one"
            )
        model_config = model_text_config(model)
        changes: dict[str, Any] = {}
        if self.num_transformer_submodules is None:
            changes["num_transformer_submodules"] = 2 if self.task_type == "SEQ_2_SEQ_LM" else 1
        for field_name, keys in _MODEL_CONFIG_KEYS.items():
            if getattr(self, field_name) is None:
                changes[field_name] = _read_model_config(model_config, keys, type(self).__name__, field_name)
        return self.replace(**changes)  # type: ignore[return-value]


_MODEL_CONFIG_KEYS = {
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "token_dim": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
}


def model_text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _read_model_config(model_config: Any, keys: tuple[str, ...], config_name: str, field_name: str) -> int:
    for key in keys:
        value = getattr(model_config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        f"{config_name}.{field_name} is not set and the model has no config giving it (looked for "
        f"{list(keys)}); set {field_name} in the config"
    )


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers encoder-decoder (T5, BART…)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def as_keywords(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model inputs as keywords: a positional first argument is transformers' ``input_ids``.

    Raises:
        TypeError: more than one positional input.
    """
    if len(args) > 1:
        raise TypeError(
            f"got {len(args)} positional inputs; with a soft prompt pass inputs by keyword, "
            "e.g. model(input_ids=..., attention_mask=...)"
        )
    if args and "input_ids" in kwargs:
        raise TypeError("input_ids given both positionally and by keyword")
    return {"input_ids": args[0], **kwargs} if args else dict(kwargs)


def refuse_user_cache(kwargs: dict[str, Any], method: str) -> None:
    """Soft prompts own the start of the sequence: a filled cache from the caller would skip them.

    Raises:
        ValueError: ``past_key_values`` holds tokens already.
    """
    cache = kwargs.get("past_key_values")
    if cache is None:
        return
    length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else len(cache)
    if length:
        raise ValueError(
            f"{method} does not take a filled past_key_values in forward(); use generate() for incremental "
            "decoding (it places the virtual tokens itself)"
        )


def ones_before(mask: Tensor, n: int) -> Tensor:
    """``mask`` (batch, seq) with ``n`` attended positions in front: (batch, n + seq)."""
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def lengthen_inputs(
    kwargs: dict[str, Any], n: int, seq_len: int, task_type: str | None, encoder_decoder: bool
) -> dict[str, Any]:
    """Make the per-position inputs cover ``n`` virtual tokens placed before the ``seq_len`` real ones.

    Args:
        kwargs: the base model's keyword inputs (``inputs_embeds`` already lengthened by the caller).
        n: virtual tokens in front of the input.
        seq_len: the caller's input length.
        task_type: decides whether ``labels`` are per token (``CAUSAL_LM``, ``TOKEN_CLS``) or per sequence;
            when unset, labels of shape (batch, seq_len) on a decoder-only model are per token.
        encoder_decoder: labels of an encoder-decoder model belong to the decoder and are left alone.

    Returns:
        ``kwargs`` with ``attention_mask`` (batch, n + seq) ones in front, ``token_type_ids`` zeros in
        front, ``position_ids`` ``0..n-1`` then the given ones shifted by n, and per-token ``labels``
        -100 in front.
    """
    out = dict(kwargs)
    if out.get("attention_mask") is not None:
        out["attention_mask"] = ones_before(out["attention_mask"], n)
    if out.get("token_type_ids") is not None:
        types = out["token_type_ids"]
        out["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], dim=1)
    if out.get("position_ids") is not None:
        positions = out["position_ids"]  # (batch, seq)
        virtual = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(
            positions.shape[0], n
        )
        out["position_ids"] = torch.cat([virtual, positions + n], dim=1)
    labels = out.get("labels")
    if labels is not None and _per_token(labels, seq_len, task_type, encoder_decoder):
        out["labels"] = torch.cat([labels.new_full((labels.shape[0], n), IGNORE_INDEX), labels], dim=1)
    return out


def _per_token(labels: Tensor, seq_len: int, task_type: str | None, encoder_decoder: bool) -> bool:
    if encoder_decoder:
        return False
    if task_type is not None:
        return task_type in PER_TOKEN_TASKS
    return labels.dim() == 2 and labels.shape[1] == seq_len


def expanded_batch(model: nn.Module, batch: int, kwargs: dict[str, Any]) -> int:
    """The batch ``generate`` runs: each row repeated ``max(num_beams, num_return_sequences)`` times."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    returned = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
    return batch * max(beams, returned)


class SoftPromptAdapter(nn.Module):
    """The parts of :class:`~peftkit.core.whole_model.ModelAdapter` every soft prompt shares.

    A soft prompt changes no weight of the base model, so it has nothing to activate, restore or merge.
    Subclasses give :meth:`prompt_embeddings_to_save` and the input preparation.
    """

    key_prefix = "base_model."  # HF PEFT saves a prompt method's modules_to_save as base_model.<module>
    merged = False

    def __init__(self, config: SoftPromptConfig) -> None:
        super().__init__()
        self.config = config

    def prompt_embeddings_to_save(self) -> Tensor:
        """The saved tensor: the learned parameter itself, or an encoder's output (detached)."""
        raise NotImplementedError

    def activate(self, model: nn.Module) -> None:
        """Nothing to do: the prompt is applied per call."""

    def deactivate(self, model: nn.Module) -> None:
        """Nothing to do: the prompt is applied per call."""

    def set_trainable(self, model: nn.Module, trainable: bool) -> None:
        """Gradients for the prompt's own parameters on or off."""
        self.requires_grad_(trainable)

    def file_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """``{"prompt_embeddings": tensor}`` as Hugging Face PEFT saves it."""
        return {self.config.file_key: self.prompt_embeddings_to_save()}

    def file_config(self, config: AdapterConfig) -> AdapterConfig:
        """Saved as configured."""
        return config

    def merge(self, model: nn.Module) -> None:
        """Raises NotImplementedError: virtual tokens are extra inputs, not a change of weights."""
        raise NotImplementedError(
            f"{self.config.peft_type} adds virtual tokens to the model's inputs and cannot be merged into "
            "the weights; keep the PeftModel (save_pretrained / peftkit.load) to use it"
        )

    def unmerge(self, model: nn.Module) -> None:
        """Nothing is ever merged."""

    def release(self, model: nn.Module, keep_values: bool) -> None:
        """Nothing to restore: the base model was never changed."""


class InputPromptAdapter(SoftPromptAdapter):
    """A soft prompt prepended to the input embeddings (prompt tuning, P-tuning).

    Subclasses give :meth:`virtual_tokens`, the (total_virtual_tokens, token_dim) matrix. On an
    encoder-decoder model the first ``num_virtual_tokens`` rows go in front of the encoder's input; the
    decoder's rows (``num_transformer_submodules=2``) are saved but unused, as in Hugging Face PEFT.
    """

    def virtual_tokens(self) -> Tensor:
        """(total_virtual_tokens, token_dim), differentiable."""
        raise NotImplementedError

    def prompt_embeddings_to_save(self) -> Tensor:
        return self.virtual_tokens().detach()

    def _prepend(
        self, model: nn.Module, kwargs: dict[str, Any], method_call: str
    ) -> tuple[dict[str, Any], int]:
        """``kwargs`` with ``inputs_embeds`` (batch, n + seq, dim) in place of ``input_ids``; and seq."""
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise ValueError(f"{self.config.peft_type} {method_call} needs input_ids or inputs_embeds")
            embeds = model.get_input_embeddings()(input_ids)  # (batch, seq, dim)
        batch, seq_len = embeds.shape[:2]
        n = self.config.num_virtual_tokens
        prompts = self.virtual_tokens()[:n].to(embeds.dtype)  # (n, dim)
        kwargs["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(batch, n, -1), embeds], dim=1)
        return kwargs, seq_len

    def prepare_inputs(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Virtual tokens in front of the input embeddings; mask, positions, types and labels lengthened."""
        kwargs = as_keywords(args, kwargs)
        refuse_user_cache(kwargs, self.config.peft_type)
        kwargs, seq_len = self._prepend(model, kwargs, "forward")
        n = self.config.num_virtual_tokens
        return (), lengthen_inputs(kwargs, n, seq_len, self.config.task_type, is_encoder_decoder(model))

    def prepare_generate(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``generate`` starts from the prompted embeddings; decoder-only models return input_ids first.

        transformers uses ``inputs_embeds`` for the first step and, given ``input_ids`` too, puts them
        (not the virtual tokens) at the start of the returned sequences.
        """
        kwargs = as_keywords(args, kwargs)
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError(f"generate() with a {self.config.peft_type} adapter needs input_ids")
        mask = kwargs.get("attention_mask")
        kwargs, _ = self._prepend(model, kwargs, "generate()")
        kwargs["attention_mask"] = ones_before(
            mask if mask is not None else torch.ones_like(input_ids), self.config.num_virtual_tokens
        )
        if not is_encoder_decoder(model):
            kwargs["input_ids"] = input_ids
        return (), kwargs
