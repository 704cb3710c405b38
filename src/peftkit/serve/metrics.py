"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

Labels stay bounded: ``endpoint`` is one of the routes or ``other``, ``adapter`` a registered adapter
or the base model's name, ``outcome`` and ``reason`` come from short fixed lists.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Requests, tokens, latency and time to first token per adapter, how requests ended, failed
    streams, batch occupancy, queue depth, running requests, and the adapters' reads, placements,
    evictions and counts per tier."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "peftkit_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.failed_streams = Counter(
            "peftkit_failed_streams",
            "streams that ended with an error event after their 200, by reason",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("peftkit_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter(
            "peftkit_completion_tokens",
            "tokens generated, by adapter (cancelled and failed requests' included)",
            ["adapter"],
            registry=r,
        )
        self.finished = Counter(
            "peftkit_requests_finished",
            "generation requests ended, by adapter and outcome (stop, length, cancelled, failed, shutdown)",
            ["adapter", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "peftkit_request_latency_seconds",
            "submission to the request's end (cancelled and failed included), by adapter",
            ["adapter"],
            buckets=_SECONDS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "peftkit_time_to_first_token_seconds",
            "submission to first token, by adapter",
            ["adapter"],
            buckets=_SECONDS,
            registry=r,
        )
        self.batch_occupancy = Histogram(
            "peftkit_batch_occupancy",
            "requests in the batch at each decoding step",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.queue_depth = Gauge("peftkit_queue_depth", "requests waiting to join the batch", registry=r)
        self.running = Gauge("peftkit_running_requests", "requests in the running batch", registry=r)
        self._adapter_metrics(r)

    def _adapter_metrics(self, r: CollectorRegistry) -> None:
        self.adapters_loaded = Gauge("peftkit_adapters_loaded", "adapters in a slot now", registry=r)
        self.adapters_resident = Gauge(
            "peftkit_adapters_resident", "adapters in the CPU tier now", registry=r
        )
        self.adapter_reads = Counter(
            "peftkit_adapter_reads",
            "adapter directories read from disk (registrations and reloads)",
            registry=r,
        )
        self.adapter_placements = Counter(
            "peftkit_adapter_placements", "adapters written into a slot", registry=r
        )
        self.adapter_evictions = Counter(
            "peftkit_adapter_evictions", "adapters evicted, by tier (slot, cpu)", ["tier"], registry=r
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
