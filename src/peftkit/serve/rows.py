"""A request in the engine: what a client submits, what it is told, and its row while it runs.

:class:`Row` is one admitted request's life, from admission to its last event: its slot lease, random
generator, text and stop strings. Every way a row ends — finished, cancelled, failed, shut down — goes
through :meth:`Row.end`, which runs once: the lease is released once, the metrics count it once, the
client hears of it once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from peftkit.serve.bank import SlotLease
from peftkit.serve.limits import GREEDY_BELOW
from peftkit.serve.sampling import SamplingParams, next_token
from peftkit.serve.text import IncrementalText, StopScanner

__all__ = ["Event", "GenerationRequest", "Row"]


@dataclass(frozen=True)
class Event:
    """What the engine tells a request: new ``text``; at the end also ``finish_reason`` (``"stop"``,
    ``"length"``) and the token counts, or an ``error`` message (and its HTTP ``status``) instead."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    status: int = 500

    @property
    def final(self) -> bool:
        """Whether this is the request's last event."""
        return self.finish_reason is not None or self.error is not None


@dataclass(eq=False)
class GenerationRequest:
    """One request: its prompt tokens, adapter (None: the base model), sampling and where events go
    (``on_event``, called on the engine's thread). ``cancelled``: its client went away."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    on_event: Callable[[Event], None]
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)

    def send(self, event: Event) -> None:
        """Tell the client, unless it went away."""
        if not self.cancelled:
            self.on_event(event)


class Row:
    """An admitted request in the running batch; see the module docstring.

    Args:
        request: the request.
        lease: its adapter's slot (released when the row ends).
        host: the model host (tokenizer, end-of-answer tokens, longest sequence, generators).
        metrics: where its tokens, latency and outcome are counted.
        label: the adapter's name for the metrics (the base model's name for none).

    Attributes:
        length: tokens of this request in the batch's KV cache.
        generated: the token ids chosen so far.
    """

    def __init__(
        self, request: GenerationRequest, lease: SlotLease, host: Any, metrics: Any, label: str
    ) -> None:
        self.request, self.lease, self.metrics, self.label = request, lease, metrics, label
        params = request.params
        greedy = params.temperature < GREEDY_BELOW
        self.generator = None if greedy else host.seed_generator(params.seed)
        self.text = IncrementalText(host.tokenizer)
        self.stops = StopScanner(params.stop)
        self.length = len(request.prompt_ids)
        self.generated: list[int] = []
        self.ended = False
        self._eos, self._max_length = host.eos_ids, host.max_length

    @property
    def slot(self) -> int:
        """The adapter slot of this row (0: the base model)."""
        return self.lease.slot

    def take(self, logits: Tensor) -> bool:
        """Choose the next token from ``logits`` (vocab,), send the text it completes; True when the
        row has ended (finished, or failed: a failure ends this row alone)."""
        try:
            token = next_token(logits, self.request.params, self.generator)
        except Exception as error:  # NaN scores, or anything else in this row's sampling
            self.end(Event(error=f"generation failed for this request: {error}", status=500), "failed")
            return True
        if not self.generated:
            self.metrics.time_to_first_token.labels(self.label).observe(
                time.perf_counter() - self.request.submitted_at
            )
        self.generated.append(token)
        finish = None
        if token in self._eos:
            piece, finish = self.stops.feed(self.text.rest()), "stop"
        else:
            piece = self.stops.feed(self.text.add(token))
            if not self.stops.stopped and self._at_length_limit():
                piece += self.stops.feed(self.text.rest())
                finish = "length"
        if self.stops.stopped:
            finish = "stop"
        elif finish is not None:
            piece += self.stops.flush()
        if finish is None:
            if piece:
                self.request.send(Event(text=piece))
            return False
        prompt = len(self.request.prompt_ids)
        done = Event(
            text=piece, finish_reason=finish, prompt_tokens=prompt, completion_tokens=len(self.generated)
        )
        self.end(done, finish)
        return True

    def end(self, event: Event, outcome: str) -> None:
        """End the row (once; later calls do nothing): release its slot, count it, tell the client.

        ``outcome``: ``stop``, ``length``, ``cancelled``, ``failed`` or ``shutdown`` (the metrics label).
        """
        if self.ended:
            return
        self.ended = True
        self.lease.release()
        self.metrics.completion_tokens.labels(self.label).inc(len(self.generated))
        self.metrics.latency.labels(self.label).observe(time.perf_counter() - self.request.submitted_at)
        self.metrics.finished.labels(self.label, outcome).inc()
        self.request.send(event)

    def _at_length_limit(self) -> bool:
        """``max_tokens`` reached, or the model's longest sequence (the next token would not fit)."""
        limit = self._max_length
        return len(self.generated) >= self.request.params.max_tokens or (
            limit is not None and self.length + 1 >= limit
        )
