"""P-tuning: virtual tokens produced by a small trainable encoder (MLP or LSTM), prepended to the inputs.

Liu et al., "GPT Understands, Too" (2021), arXiv:2103.10385.

The encoder reparameterizes the virtual tokens while training: ``tokens = head(E)`` with E the
(total_virtual_tokens, token_dim) embedding. Only its output is needed afterwards, so that is what is
saved (``prompt_embeddings``, as Hugging Face PEFT saves it), and a loaded adapter is a plain embedding
holding it (``inference_mode``): trained further after loading, it trains those vectors directly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from peftkit.methods.soft_prompt import InputPromptAdapter, SoftPromptConfig

ENCODER_TYPES = ("MLP", "LSTM")
MLP_LAYERS = 2  # HF PEFT's default encoder_num_layers; its MLP always has three linear layers


@dataclass(frozen=True)
class PromptEncoderConfig(SoftPromptConfig):
    """P-tuning settings; field names and defaults are Hugging Face PEFT's.

    Args:
        encoder_reparameterization_type: ``"MLP"`` (Linear-ReLU-Linear-ReLU-Linear) or ``"LSTM"``
            (a bidirectional LSTM, then Linear-ReLU-Linear).
        encoder_hidden_size: the encoder's width; default ``token_dim``.
        encoder_num_layers: LSTM layers (the MLP ignores it, as in HF PEFT).
        encoder_dropout: dropout between LSTM layers.
    """

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = MLP_LAYERS
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_reparameterization_type not in ENCODER_TYPES:
            raise ValueError(
                "PromptEncoderConfig.encoder_reparameterization_type="
                f"{self.encoder_reparameterization_type!r} must be one of {list(ENCODER_TYPES)}"
            )
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(
                f"PromptEncoderConfig.encoder_dropout={self.encoder_dropout!r} must be in [0, 1)"
            )

    def resolve(self, model: nn.Module) -> PromptEncoderConfig:
        config = super().resolve(model)
        if config.encoder_hidden_size is None:
            config = config.replace(encoder_hidden_size=config.token_dim)
        return config  # type: ignore[return-value]

    def build_model_adapter(self, model: nn.Module) -> PromptEncoder:
        """The encoder (or, with ``inference_mode``, the plain embedding a saved adapter loads into)."""
        return PromptEncoder(self)


class PromptEncoder(InputPromptAdapter):
    """``embedding`` (total_virtual_tokens, token_dim) and, unless ``inference_mode``, the encoder head.

    Args:
        config: a resolved :class:`PromptEncoderConfig`.
    """

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__(config)
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(config.total_virtual_tokens, dim)
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if config.inference_mode:
            return
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim)
            )
        else:
            if config.encoder_num_layers != MLP_LAYERS:
                warnings.warn(
                    f"encoder_num_layers={config.encoder_num_layers} is ignored by the MLP encoder, which "
                    "always has three linear layers (as in Hugging Face PEFT)",
                    stacklevel=2,
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, dim),
            )

    def virtual_tokens(self) -> Tensor:
        """(total_virtual_tokens, token_dim): the encoder's output, or the embedding once loaded."""
        tokens = self.embedding.weight  # (total, dim)
        if self.lstm_head is not None:
            tokens = self.lstm_head(tokens.unsqueeze(0))[0].squeeze(0)  # (total, 2·hidden)
        if self.mlp_head is not None:
            tokens = self.mlp_head(tokens)  # (total, dim)
        return tokens

    def prompt_embeddings_to_save(self) -> Tensor:
        if self.mlp_head is None:
            return self.embedding.weight  # the parameter itself: loading a file copies into it
        return self.virtual_tokens().detach()
