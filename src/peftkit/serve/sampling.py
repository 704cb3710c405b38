"""Choosing the next token: a pure function, one request's row at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from peftkit.serve.limits import GREEDY_BELOW

__all__ = ["SamplingParams", "next_token"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    Attributes:
        max_tokens: the most new tokens.
        temperature: 0 (or below :data:`GREEDY_BELOW`) for greedy (argmax); else logits are divided by
            it before sampling.
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities add up to
            at least ``top_p`` (1: all tokens).
        seed: seeds the request's own generator (same seed, same request: same text); None: random.
        stop: strings that end the answer; the answer is cut before the first one found.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token id for one row.

    Args:
        logits: (vocab,) the model's scores for the next position.
        params: the request's temperature and top_p.
        generator: the request's random generator (unused when greedy).

    Returns:
        The argmax when ``temperature`` is below :data:`GREEDY_BELOW`, else a sample. The most likely
        token is always among those top_p keeps, however small top_p is.

    Raises:
        ValueError: the logits hold NaN (a broken adapter or model), when sampling.
    """
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    scaled = (logits.float() - logits.max().float()) / params.temperature  # (vocab,), at most 0: no overflow
    probs = torch.softmax(scaled, dim=-1)  # (vocab,)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # (vocab,), (vocab,)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
        keep = before < params.top_p
        keep[0] = True  # a top_p that rounds to 0 in float32 still keeps the most likely token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if torch.isnan(probs).any():
        raise ValueError("the model's scores for this request hold NaN")
    return int(torch.multinomial(probs, 1, generator=generator))
