"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Requests, tokens, latency and time to first token, cancellations, batch occupancy, queue depth,
    adapters loaded."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "peftkit_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("peftkit_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("peftkit_completion_tokens", "tokens generated", registry=r)
        self.cancelled = Counter(
            "peftkit_requests_cancelled", "requests whose client went away before the end", registry=r
        )
        self.latency = Histogram(
            "peftkit_request_latency_seconds", "submission to last token", buckets=_SECONDS, registry=r
        )
        self.time_to_first_token = Histogram(
            "peftkit_time_to_first_token_seconds", "submission to first token", buckets=_SECONDS, registry=r
        )
        self.batch_occupancy = Histogram(
            "peftkit_batch_occupancy",
            "requests in the batch at each decoding step",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.queue_depth = Gauge("peftkit_queue_depth", "requests waiting to join the batch", registry=r)
        self.adapters_loaded = Gauge("peftkit_adapters_loaded", "adapters in the model now", registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
