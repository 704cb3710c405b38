"""The served model and the one lock held while it runs.

:class:`ModelHost` owns the base language model (its linear layers wrapped by the bank's slots), its
tokenizer and what the engine needs to know of them (end-of-answer tokens, the longest sequence, how
the model takes its KV cache), and :attr:`ModelHost.lock`: the engine holds it for each turn of its
loop, so whoever else touches the model (tests pausing the engine) takes it too. Each forward gets the
batch's row → slot mapping as plain metadata, set for that call only.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.ops.multi_lora import RowSlots
from peftkit.serve.batch_cache import check_supported
from peftkit.serve.slots import BatchContext

__all__ = ["ModelHost"]


class ModelHost:
    """A causal language model served to many requests at once.

    Args:
        model: a transformers causal LM (``config``, ``forward(input_ids, attention_mask, position_ids,
            <cache>, use_cache)``) whose KV cache is a plain ``DynamicCache``.
        tokenizer: its tokenizer.

    Attributes:
        lock: held while the model runs or its slots change.
        context: where each forward's row → slot mapping is put for the layers.
        eos_ids: the token ids that end an answer.
        max_length: the model's longest sequence (positions), or None.
        device: where its parameters live.

    Raises:
        ValueError: a model whose cache is not a plain ``DynamicCache`` (sliding windows, hybrid).
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        self.context = BatchContext()
        self.device = next(model.parameters()).device
        self.eos_ids = _eos_ids(model, tokenizer)
        self.max_length: int | None = getattr(model.config, "max_position_embeddings", None)
        parameters = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed past_key_values to cache (the old name warns at every call)
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in parameters
        check_supported(self.new_cache())

    def new_cache(self) -> Any:
        """An empty KV cache for this model."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        cache: Any,
        rows: RowSlots,
        last_only: bool = False,
    ) -> Tensor:
        """One forward over a batch; ``cache`` is extended in place.

        Args:
            input_ids: (batch, tokens).
            attention_mask: (batch, cached + tokens), 1 on each row's own positions.
            position_ids: (batch, tokens).
            cache: the batch's KV cache (rows in the order of ``input_ids``).
            rows: each row's adapter slot.
            last_only: compute the logits of the last position only (a prefill).

        Returns:
            (batch, vocab) logits of each row's last position.
        """
        extra = {"logits_to_keep": 1} if last_only and self._logits_to_keep else {}
        extra[self._cache_argument] = cache
        self.context.rows = rows
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **extra,
            )
        finally:
            self.context.rows = None
        return out.logits[:, -1]

    def seed_generator(self, seed: int | None) -> torch.Generator:
        """A random generator on the model's device: seeded with ``seed``, else from the OS."""
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The token ids that end an answer: the generation config's, else the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    return {int(i) for i in ids if i is not None}
