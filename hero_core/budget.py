"""Token budgets: exact integer shares with caps, and the statistics behind them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def total_budget(ratio: float, tokens_per_crop: int, num_crops: int) -> int:
    """`round(R * tokens_per_crop * crops)`, rounding halves up (not to even)."""
    return math.floor(ratio * tokens_per_crop * num_crops + 0.5)


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def allocate(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Integer shares of `total` in proportion to `weights`, each at most its cap.

    Shares that would exceed their cap are fixed at the cap and the overflow is
    redistributed over the rest by weight (then evenly, once only zero-weight
    entries are left); the fractions are settled by largest remainder, lower index
    first on ties. The shares sum to exactly `min(total, sum(caps))`.
    """
    if len(weights) != len(caps):
        raise ValueError("weights and caps must have the same length")
    n = len(caps)
    alloc = [0] * n
    fixed = [cap <= 0 for cap in caps]
    remaining = min(max(total, 0), sum(max(c, 0) for c in caps))
    while remaining > 0:
        free = [i for i in range(n) if not fixed[i]]
        w = [float(weights[i]) if math.isfinite(weights[i]) and weights[i] > 0 else 0.0
             for i in free]
        if sum(w) <= 0.0:
            w = [1.0] * len(free)
        total_w = sum(w)
        quota = {i: remaining * (wi / total_w) for i, wi in zip(free, w, strict=True)}
        over = [i for i in free if quota[i] >= caps[i]]
        if over:
            for i in over:
                alloc[i] = min(caps[i], remaining)
                fixed[i] = True
                remaining -= alloc[i]
            continue
        floors = {i: min(math.floor(q), caps[i]) for i, q in quota.items()}
        left = remaining - sum(floors.values())
        by_remainder = sorted(free, key=lambda i: (floors[i] - quota[i], i))
        for i in free:
            alloc[i] = floors[i]
        while left > 0:  # one pass suffices unless float rounding left more
            for i in by_remainder:
                if left > 0 and alloc[i] < caps[i]:
                    alloc[i] += 1
                    left -= 1
        break
    return alloc


def zscore(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise `(K,)` across its entries (population std); all zeros when flat."""
    x = x.double()
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std(unbiased=False)
    if float(std) < eps:
        return torch.zeros_like(x)
    return (x - x.mean()) / std
