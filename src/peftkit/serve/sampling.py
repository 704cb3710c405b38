"""Choosing the next token and finding stop strings: pure functions, one request's row at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SamplingParams", "emittable_length", "find_stop", "next_token"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    Attributes:
        max_tokens: the most new tokens.
        temperature: 0 for greedy (argmax); else logits are divided by it before sampling.
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
        The token id: the argmax when ``temperature == 0``, else a sample.
    """
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (vocab,)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # (vocab,), (vocab,)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs = torch.where(before < params.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)  # the first token always stays
    return int(torch.multinomial(probs, 1, generator=generator))


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string in ``text`` begins, or None when there is none."""
    found = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return min(found) if found else None


def emittable_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` (an unfinished answer with no stop string in it) can be sent now.

    Held back: a trailing part that may be the start of a stop string, and a trailing U+FFFD (the
    decoder's stand-in for the first bytes of a character whose last bytes are still to come).
    """
    end = len(text)
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                end = min(end, len(text) - size)
                break
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end
