"""Prometheus metrics of the language service."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 320, 640, 1024, 2048, 2928, 4096, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class LanguageMetrics:
    """All language-service metrics, in a registry of their own; also the engine's
    observer (`EngineObserver`) for its steps and queue waits."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hero_language_requests", "Generate calls by final status code",
                                ["code"], registry=r)
        self.in_flight = Gauge("hero_language_in_flight", "Generations running now", registry=r)
        self.ttft = Histogram("hero_language_ttft_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.prefill = Histogram("hero_language_prefill_seconds", "Prefill forward time",
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.decode_rate = Histogram("hero_language_decode_tokens_per_second",
                                     "Decode speed after the first token", buckets=RATE_BUCKETS,
                                     registry=r)
        self.visual_tokens = Histogram("hero_language_visual_tokens",
                                       "Visual tokens received per request",
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.completion_tokens = Counter("hero_language_completion_tokens",
                                         "Tokens generated", registry=r)
        self.running = Gauge("hero_language_running_sequences",
                             "Sequences the engine runs now (prefill or decode)", registry=r)
        self.waiting = Gauge("hero_language_waiting_sequences",
                             "Sequences waiting in the engine for room", registry=r)
        self.kv_reserved = Gauge("hero_language_kv_tokens_reserved",
                                 "KV cache tokens reserved by running sequences", registry=r)
        self.kv_capacity = Gauge("hero_language_kv_tokens_capacity",
                                 "KV cache size in tokens", registry=r)
        self.batch_size = Histogram("hero_language_batch_size",
                                    "Sequences in each batched decode step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step = Histogram("hero_language_decode_step_seconds",
                              "Time of each batched decode step", buckets=STEP_BUCKETS_S,
                              registry=r)
        self.queue_wait = Histogram("hero_language_queue_wait_seconds",
                                    "Time a request waited in the engine for room",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self._kv_metrics(r)

    def _kv_metrics(self, r: CollectorRegistry) -> None:
        self.prefix_query_tokens = Counter(
            "hero_language_prefix_cache_query_tokens",
            "Tokens admitted sequences needed in the KV cache (prompt, or prompt and answer "
            "so far after a preemption)", registry=r)
        self.prefix_hit_tokens = Counter(
            "hero_language_prefix_cache_hit_tokens",
            "Of those, tokens found in the prefix cache instead of computed", registry=r)
        self.prefix_hit_rate = Gauge(
            "hero_language_prefix_cache_hit_rate",
            "Hit tokens over query tokens since the start", registry=r)
        self._prefix_tokens = (0, 0)
        self.prefix_hit_rate.set_function(self._hit_rate)
        self.kv_blocks_free = Gauge("hero_language_kv_blocks_free",
                                    "KV blocks no sequence holds (cached ones included)",
                                    registry=r)
        self.kv_blocks_cached = Gauge("hero_language_kv_blocks_cached",
                                      "KV blocks holding a reusable prefix", registry=r)
        self.preemptions = Counter("hero_language_preemptions",
                                   "Sequences preempted for lack of KV blocks (recomputed "
                                   "later)", registry=r)

    def _hit_rate(self) -> float:
        queried, hits = self._prefix_tokens
        return hits / queried if queried else 0.0

    def watch(self, stats: Callable[[], Any]) -> None:
        """Read the gauges from the engine's `stats()` at every scrape."""
        self.running.set_function(lambda: stats().running)
        self.waiting.set_function(lambda: stats().waiting)
        self.kv_reserved.set_function(lambda: stats().kv_tokens_reserved)
        self.kv_capacity.set_function(lambda: stats().kv_tokens_capacity)
        self.kv_blocks_free.set_function(lambda: stats().kv_blocks_free)
        self.kv_blocks_cached.set_function(lambda: stats().kv_blocks_cached)

    def observe_step(self, batch_size: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.step.observe(seconds)

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def observe_prefix_cache(self, tokens: int, hit_tokens: int) -> None:
        self.prefix_query_tokens.inc(tokens)
        self.prefix_hit_tokens.inc(hit_tokens)
        queried, hits = self._prefix_tokens
        self._prefix_tokens = (queried + tokens, hits + hit_tokens)  # one consistent pair

    def observe_preemption(self) -> None:
        self.preemptions.inc()

    def finish(self, code: str) -> None:
        self.requests.labels(code).inc()

    def observe_generation(self, ttft_ms: float, prefill_ms: float, tokens_per_s: float,
                           completion_tokens: int) -> None:
        self.ttft.observe(ttft_ms / 1e3)
        self.prefill.observe(prefill_ms / 1e3)
        if tokens_per_s > 0:
            self.decode_rate.observe(tokens_per_s)
        self.completion_tokens.inc(completion_tokens)
