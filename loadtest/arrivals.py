"""When requests are sent: open loop (Poisson arrivals) or closed loop (fixed concurrency)."""

from __future__ import annotations

import random


def poisson_offsets(rate_per_s: float, count: int, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of `count` Poisson arrivals at `rate_per_s`.

    Gaps are exponential with mean 1/rate, so the count in any window is Poisson; the
    schedule does not depend on how fast the server answers (open loop).
    """
    if rate_per_s <= 0:
        raise ValueError("rate_per_s must be positive")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate_per_s)
        out.append(t)
    return out
