"""The server's Prometheus metrics: names, labels, and the exposition text they render to."""

from __future__ import annotations

from peftkit.serve.metrics import Metrics


def _value(text: str, line_start: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(line_start)).rsplit(" ", 1)[1])


def test_each_metric_renders_with_its_labels() -> None:
    metrics = Metrics()
    metrics.requests.labels("/v1/completions", "200").inc()
    metrics.failed_streams.labels("shutdown").inc()
    metrics.completion_tokens.labels("alpha").inc(7)
    metrics.finished.labels("alpha", "cancelled").inc()
    metrics.latency.labels("alpha").observe(0.3)
    metrics.time_to_first_token.labels("tiny").observe(0.05)
    metrics.batch_occupancy.observe(3)
    metrics.queue_depth.set(2)
    metrics.running.set_function(lambda: 5)
    metrics.adapters_loaded.set_function(lambda: 1)
    metrics.adapter_reads.inc(4)
    metrics.adapter_placements.inc(2)
    metrics.adapter_evictions.labels("slot").inc()
    text = metrics.render().decode()
    assert _value(text, 'peftkit_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert _value(text, 'peftkit_failed_streams_total{reason="shutdown"}') == 1
    assert _value(text, 'peftkit_completion_tokens_total{adapter="alpha"}') == 7
    assert _value(text, 'peftkit_requests_finished_total{adapter="alpha",outcome="cancelled"}') == 1
    assert _value(text, 'peftkit_request_latency_seconds_bucket{adapter="alpha",le="0.5"}') == 1
    assert _value(text, 'peftkit_request_latency_seconds_bucket{adapter="alpha",le="0.25"}') == 0
    assert _value(text, 'peftkit_time_to_first_token_seconds_count{adapter="tiny"}') == 1
    assert _value(text, "peftkit_running_requests ") == 5
    assert _value(text, "peftkit_queue_depth ") == 2
    assert _value(text, "peftkit_adapter_reads_total ") == 4
    assert _value(text, 'peftkit_adapter_evictions_total{tier="slot"}') == 1


def test_two_servers_in_one_process_keep_their_own_counts() -> None:
    first, second = Metrics(), Metrics()
    first.adapter_reads.inc()
    assert _value(second.render().decode(), "peftkit_adapter_reads_total ") == 0
