"""Latency percentiles and run summaries."""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclasses.dataclass
class Outcome:
    """One request's fate."""

    code: str
    """gRPC status name; OK for an answer."""
    sent_at: float
    ttft_s: float | None = None
    e2e_s: float | None = None
    cache_hit: bool | None = None
    visual_tokens: int = 0
    bytes_sent: int = 0
    tokens: int = 0
    """Tokens generated."""

    @property
    def itl_s(self) -> float | None:
        """Mean time between this answer's tokens after the first (None below 2 tokens)."""
        if self.ttft_s is None or self.e2e_s is None or self.tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)


def summarize(outcomes: Sequence[Outcome], duration_s: float) -> dict[str, object]:
    """Counts, throughput and latency percentiles of a run."""
    ok = [o for o in outcomes if o.code == "OK"]
    ttft = [o.ttft_s * 1e3 for o in ok if o.ttft_s is not None]
    e2e = [o.e2e_s * 1e3 for o in ok if o.e2e_s is not None]
    itl = [o.itl_s * 1e3 for o in ok if o.itl_s is not None]

    def pct(values: list[float]) -> dict[str, float]:
        return {f"p{q}": percentile(values, q) for q in (50, 95, 99)}

    return {
        "requests": len(outcomes), "ok": len(ok),
        "codes": dict(collections.Counter(o.code for o in outcomes)),
        "duration_s": duration_s,
        "throughput_rps": len(ok) / duration_s if duration_s > 0 else math.nan,
        "ttft_ms": pct(ttft), "e2e_ms": pct(e2e), "itl_ms": pct(itl),
        "output_tokens_per_s": (sum(o.tokens for o in ok) / duration_s if duration_s > 0
                                else math.nan),
        "cache_hit_ratio": (sum(1 for o in ok if o.cache_hit) / len(ok)) if ok else math.nan,
        "visual_tokens_mean": (sum(o.visual_tokens for o in ok) / len(ok)) if ok else math.nan,
        "bytes_sent_mean": (sum(o.bytes_sent for o in ok) / len(ok)) if ok else math.nan,
    }
