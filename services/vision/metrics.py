"""Prometheus metrics of the vision service, through Ray's metrics export.

Ray Serve replicas are many processes; `ray.serve.metrics` aggregates them and every
Ray node exposes them on its metrics export port (`ray_` prefix added by Ray), with
the deployment and replica as tags.
"""

from __future__ import annotations

from ray.serve import metrics

MS_BUCKETS = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
TOKEN_BUCKETS = [16, 32, 64, 128, 256, 320, 640, 1024, 2048, 2928, 4096]
BYTE_BUCKETS = [1 << k for k in range(10, 27, 2)]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 32]


class VisionMetrics:
    """All vision-service metrics (created per replica, aggregated by Ray)."""

    def __init__(self) -> None:
        self.cache = metrics.Counter(
            "hero_vision_cache_events", "Token cache events: hit, miss, coalesced, "
            "corrupt, unverified, error_get, error_set, too_large, lock_lost", tag_keys=("event",))
        self.requests = metrics.Counter("hero_vision_requests", "Calls by RPC and final code",
                                        tag_keys=("rpc", "code"))
        self.stage_ms = metrics.Histogram(
            "hero_vision_stage_ms", "Time per stage: encode, prune, queue, vision, ttft",
            boundaries=MS_BUCKETS, tag_keys=("stage",))
        self.tokens_kept = metrics.Histogram("hero_vision_tokens_kept", "Visual tokens kept",
                                             boundaries=TOKEN_BUCKETS)
        self.bytes_sent = metrics.Histogram("hero_vision_bytes_sent",
                                            "Visual-token bytes sent per request",
                                            boundaries=BYTE_BUCKETS)
        self.batch_size = metrics.Histogram("hero_vision_encoder_batch_size",
                                            "Images per vision-tower pass",
                                            boundaries=BATCH_BUCKETS)

    def observe(self, event: str) -> None:
        """Cache event (the `CacheMetrics` protocol)."""
        self.cache.inc(1, tags={"event": event})

    def stage(self, stage: str, ms: float) -> None:
        self.stage_ms.observe(ms, tags={"stage": stage})

    def observe_batch(self, size: int, encode_ms: float) -> None:
        self.batch_size.observe(size)
        self.stage("encode", encode_ms)
