"""Prometheus metrics of an HTTP-served `Server`, in a registry of its own (several apps per process).

Latencies are histograms observed as each request finishes; the scheduler's state (queue, running,
KV pages, preemptions, prefix-cache hits) is read at scrape time by a collector, so a scrape never
waits for a scheduler step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)


class _SchedulerCollector:
    def __init__(self, server: Any, api: Any) -> None:
        self.server, self.api = server, api

    def collect(self) -> Iterator[Any]:
        s = self.server
        kv = s.kv
        waiting = len(s.waiting) + len(s._incoming)
        yield GaugeMetricFamily("kiln_requests_waiting", "Sequences queued for the scheduler", value=waiting)
        yield GaugeMetricFamily("kiln_requests_running", "Sequences in the running batch", value=len(s.running))
        yield GaugeMetricFamily(
            "kiln_http_requests_active", "HTTP generation requests in flight (sequences)", value=self.api.active
        )
        yield GaugeMetricFamily("kiln_kv_pages_in_use", "KV-cache pages held by sequences", value=kv.used)
        yield GaugeMetricFamily("kiln_kv_pages_total", "KV-cache pages in the pool", value=kv.num_pages)
        yield GaugeMetricFamily("kiln_kv_pages_cached", "Pages kept by the prefix cache", value=len(kv.by_hash))
        yield CounterMetricFamily("kiln_preemptions", "Sequences preempted for lack of KV pages", value=s.preemptions)
        yield CounterMetricFamily(
            "kiln_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", value=kv.hit_tokens
        )
        yield CounterMetricFamily(
            "kiln_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache", value=kv.query_tokens
        )


class ServeMetrics:
    """Histograms and counters the HTTP layer observes, plus the scheduler's state at scrape time."""

    def __init__(self, server: Any, api: Any) -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram(
            "kiln_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY, registry=r
        )
        self.tpot = Histogram(
            "kiln_time_per_output_token_seconds",
            "Mean time between tokens after the first",
            buckets=_PER_TOKEN,
            registry=r,
        )
        self.latency = Histogram("kiln_request_latency_seconds", "Arrival to finish", buckets=_LATENCY, registry=r)
        self.generated = Counter("kiln_generation_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("kiln_prompt_tokens", "Prompt tokens received", registry=r)
        self.finished = Counter("kiln_requests_finished", "Sequences finished", ["finish_reason"], registry=r)
        self.rejected = Counter("kiln_requests_rejected", "Requests refused", ["reason"], registry=r)
        r.register(_SchedulerCollector(server, api))

    def observe(self, m: dict) -> None:
        """One finished sequence's record (RequestHandle.metrics)."""
        if m.get("ttft_s") is not None:
            self.ttft.observe(m["ttft_s"])
        if m.get("tpot_s") is not None:
            self.tpot.observe(m["tpot_s"])
        if m.get("latency_s") is not None:
            self.latency.observe(m["latency_s"])
        self.generated.inc(m.get("output_tokens", 0))
        self.finished.labels(m.get("finish_reason", "unknown")).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
