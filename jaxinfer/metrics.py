"""Prometheus metrics of one server, on its own registry (never the global one).

The scheduler reports request life cycles (started, first token, finished by
reason), queue depth, decode rows in use, KV-cache pages (in use / free / cached),
preemptions and prefix-cache hits; the gRPC servicer reports every call's status
code, the HTTP front end every response's route and status. :meth:`Metrics.serve_http`
exposes them on ``/metrics``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

if TYPE_CHECKING:
    from jaxinfer.blocks import BlockStats

FINISH_REASONS = ("stop", "length", "cancelled", "deadline", "error")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    """All metrics of one server. Every method is thread-safe."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "jaxinfer_time_to_first_token_seconds", "Submit to first generated token.", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "jaxinfer_time_per_output_token_seconds", "Mean time between output tokens of a request.",
            buckets=_TPOT_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "jaxinfer_e2e_request_latency_seconds", "Submit to finish.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "jaxinfer_queue_time_seconds", "Submit to slot admission.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_requests = Gauge("jaxinfer_queue_requests", "Requests waiting for admission.", registry=r)
        self.queue_tokens = Gauge("jaxinfer_queue_tokens", "Prompt tokens of the requests waiting.", registry=r)
        self.active_seqs = Gauge("jaxinfer_active_seqs", "Sequences holding a decode row.", registry=r)
        self.max_seqs = Gauge("jaxinfer_max_seqs", "Decode rows in total.", registry=r)
        self.kv_cache_usage = Gauge(
            "jaxinfer_kv_cache_usage_ratio", "KV cache pages referenced by a sequence / pages in the pool.", registry=r
        )
        self.kv_pages = Gauge(
            "jaxinfer_kv_pages", "KV cache pages by state (used: referenced; free; cached: evictable prefix pages).",
            ["state"], registry=r,
        )
        self.preemptions = Counter(
            "jaxinfer_preemptions", "Running sequences preempted (requeued for recompute) for want of pages.",
            registry=r,
        )
        self.prefix_query_tokens = Counter(
            "jaxinfer_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache at admission.",
            registry=r,
        )
        self.prefix_hit_tokens = Counter(
            "jaxinfer_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache (not prefilled).",
            registry=r,
        )
        self.prefix_hit_rate = Gauge(
            "jaxinfer_prefix_cache_hit_rate", "Prefix-cache hit tokens / query tokens since start.", registry=r
        )
        self.prompt_tokens = Counter("jaxinfer_prompt_tokens", "Prompt tokens of requests admitted into a slot.", registry=r)
        self.generation_tokens = Counter("jaxinfer_generation_tokens", "Tokens generated.", registry=r)
        self.requests_started = Counter(
            "jaxinfer_requests_started", "Generate requests accepted into the queue.", registry=r
        )
        self.requests_finished = Counter(
            "jaxinfer_requests_finished", "Generate requests finished, by reason.", ["reason"], registry=r
        )
        self.requests_rejected = Counter(
            "jaxinfer_requests_rejected", "Requests refused before queueing, by cause.", ["cause"], registry=r
        )
        self.grpc_requests = Counter(
            "jaxinfer_grpc_requests", "gRPC calls handled, by method and status code.", ["method", "code"],
            registry=r,
        )
        self.http_requests = Counter(
            "jaxinfer_http_requests", "HTTP requests handled, by route and status code.", ["route", "code"],
            registry=r,
        )
        for reason in FINISH_REASONS:
            self.requests_finished.labels(reason)
        self._http: tuple | None = None
        self._lock = threading.Lock()

    # -- reporting ---------------------------------------------------------------------------------

    def request_started(self) -> None:
        self.requests_started.inc()

    def request_rejected(self, cause: str) -> None:
        self.requests_rejected.labels(cause).inc()

    def request_admitted(self, queue_seconds: float, prompt_tokens: int) -> None:
        self.queue_time.observe(queue_seconds)
        self.prompt_tokens.inc(prompt_tokens)

    def first_token(self, ttft_seconds: float) -> None:
        self.ttft.observe(ttft_seconds)

    def tokens_generated(self, n: int) -> None:
        self.generation_tokens.inc(n)

    def preempted(self) -> None:
        self.preemptions.inc()

    def prefix_lookup(self, query_tokens: int, hit_tokens: int) -> None:
        self.prefix_query_tokens.inc(query_tokens)
        self.prefix_hit_tokens.inc(hit_tokens)

    def request_finished(self, reason: str, e2e_seconds: float, tpot_seconds: float | None) -> None:
        self.requests_finished.labels(reason).inc()
        self.e2e.observe(e2e_seconds)
        if tpot_seconds is not None:
            self.tpot.observe(tpot_seconds)

    def set_load(
        self, *, queue_requests: int, queue_tokens: int, active_seqs: int, max_seqs: int, pages: BlockStats
    ) -> None:
        self.queue_requests.set(queue_requests)
        self.queue_tokens.set(queue_tokens)
        self.active_seqs.set(active_seqs)
        self.max_seqs.set(max_seqs)
        self.kv_cache_usage.set(pages.used / max(1, pages.num_pages))
        self.kv_pages.labels("used").set(pages.used)
        self.kv_pages.labels("free").set(pages.free)
        self.kv_pages.labels("cached").set(pages.cached)
        self.prefix_hit_rate.set(pages.hit_rate)

    def grpc_call(self, method: str, code: str) -> None:
        self.grpc_requests.labels(method, code).inc()

    def http_call(self, route: str, code: str) -> None:
        self.http_requests.labels(route, code).inc()

    # -- reading -----------------------------------------------------------------------------------

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample (e.g. ``jaxinfer_requests_finished_total``); 0 when absent."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    def finished_by_reason(self) -> dict[str, float]:
        return {r: self.value("jaxinfer_requests_finished_total", {"reason": r}) for r in FINISH_REASONS}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> int:
        """Start the ``/metrics`` HTTP exporter; returns the bound port."""
        with self._lock:
            if self._http is None:
                self._http = start_http_server(port, addr, registry=self.registry)
            return self._http[0].server_port

    def close(self) -> None:
        with self._lock:
            if self._http is not None:
                server, thread = self._http
                server.shutdown()
                server.server_close()
                thread.join(timeout=5)
                self._http = None
