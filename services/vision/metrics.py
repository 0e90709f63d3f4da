"""Prometheus metrics of the vision service, through Ray's metrics export.

Ray Serve replicas are many processes; `ray.serve.metrics` aggregates them and every
Ray node exposes them on its metrics export port (`ray_` prefix added by Ray, `_total`
added to counters), with the deployment and replica as tags. Names follow Prometheus'
conventions: base units (`_seconds`, `_bytes`) and one series per fact.
"""

from __future__ import annotations

from ray.serve import metrics

SECONDS_BUCKETS: list[float] = [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                2.5, 5, 10, 30]
TOKEN_BUCKETS: list[float] = [16, 32, 64, 128, 256, 320, 640, 1024, 2048, 2928, 4096]
BYTE_BUCKETS: list[float] = [float(1 << k) for k in range(10, 27, 2)]
BATCH_BUCKETS: list[float] = [1, 2, 3, 4, 6, 8, 12, 16, 32]


class VisionMetrics:
    """All vision-service metrics (created per replica, aggregated by Ray)."""

    def __init__(self) -> None:
        self.cache = metrics.Counter(
            "hero_vision_cache_events", "Token cache events: hit, miss, coalesced, "
            "corrupt, unverified, error_get, error_set, too_large, lock_lost", tag_keys=("event",))
        self.cache_store_failures = metrics.Counter(
            "hero_vision_cache_store_failures", "Failed token cache store calls (each served as a "
            "miss) by kind: tls, auth, connection, timeout, error", tag_keys=("reason",))
        self.cache_up = metrics.Gauge(
            "hero_vision_cache_up", "1 while the token cache store answers, 0 from a failed "
            "call until one succeeds (requests are then served as misses)")
        # ray annotates tag_keys as a 1-tuple; any tuple of names is accepted
        self.requests = metrics.Counter("hero_vision_requests", "Calls by RPC and final code",
                                        tag_keys=("rpc", "code"))  # type: ignore[arg-type]
        self.stage_seconds = metrics.Histogram(
            "hero_vision_stage_seconds", "Time per stage: encode, queue, vision, ttft",
            boundaries=SECONDS_BUCKETS, tag_keys=("stage",))
        self.tokens_kept = metrics.Histogram("hero_vision_tokens_kept", "Visual tokens kept",
                                             boundaries=TOKEN_BUCKETS)
        self.sent_bytes = metrics.Histogram("hero_vision_sent_bytes",
                                            "Visual-token bytes sent per request",
                                            boundaries=BYTE_BUCKETS)
        self.batch_size = metrics.Histogram("hero_vision_encoder_batch_size",
                                            "Images per vision-tower pass",
                                            boundaries=BATCH_BUCKETS)

    def observe(self, event: str) -> None:
        """Cache event (the `CacheMetrics` protocol)."""
        self.cache.inc(1, tags={"event": event})

    def store_error(self, reason: str) -> None:
        """A failed store call, by kind (the `CacheMetrics` protocol)."""
        self.cache_store_failures.inc(1, tags={"reason": reason})

    def store_up(self, up: bool) -> None:
        """Whether the store answers (the `CacheMetrics` protocol)."""
        self.cache_up.set(1 if up else 0)

    def stage(self, stage: str, ms: float) -> None:
        """Time of one stage, given in milliseconds (as in the API), kept in seconds."""
        self.stage_seconds.observe(ms / 1e3, tags={"stage": stage})

    def observe_batch(self, size: int, encode_ms: float) -> None:
        self.batch_size.observe(size)
        self.stage("encode", encode_ms)
