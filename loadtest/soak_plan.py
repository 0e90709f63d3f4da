"""What the soak sends and records: the kinds of request in its mix with the status each
deserves, a request's outcome, an injected fault, and the run's timing constants. Shared
by the soak (`soak.py`) and its report (`soak_report.py`)."""

from __future__ import annotations

import dataclasses

TOKEN = "soak-token"
DEGRADED = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
GRACE_S = 10.0
"""A request without a final status this long after its deadline counts as lost."""
MEMORY_PERIOD_S = 15.0
"""How often the fault-free third samples each process's RSS."""


# ---- traffic --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of request in the mix."""

    name: str
    weight: float
    expected: str
    """The status this request deserves when nothing is failing."""
    what: str


KINDS = (
    Kind("hit", 0.34, "OK", "Generate, 8 tokens, an image sent before (cache hit)"),
    Kind("miss", 0.12, "OK", "Generate, 8 tokens, a new image (encode + store)"),
    Kind("prune", 0.12, "OK", "Prune: the pruned tokens themselves, float16"),
    Kind("cancel", 0.05, "CANCELLED", "a long answer the client cancels after its first text"),
    Kind("deadline", 0.05, "DEADLINE_EXCEEDED", "a long answer with a 1 s client deadline"),
    Kind("garbage-image", 0.04, "INVALID_ARGUMENT", "image bytes that are not an image"),
    Kind("pixel-bomb", 0.04, "INVALID_ARGUMENT", "a 10000x8000 PNG of 12 kB (pixel limit)"),
    Kind("bad-retention", 0.04, "INVALID_ARGUMENT", "retention 1.5"),
    Kind("bad-method", 0.04, "INVALID_ARGUMENT", "an unknown pruning method"),
    Kind("bad-params", 0.04, "INVALID_ARGUMENT", "max_new_tokens 0"),
    Kind("long-prompt", 0.04, "INVALID_ARGUMENT", "a 20,000-character prompt"),
    Kind("unknown-image", 0.04, "NOT_FOUND", "an image_id the service never saw"),
    Kind("bad-token", 0.04, "UNAUTHENTICATED", "a wrong bearer token"),
)
LONG = {"max_new_tokens": 4096, "ignore_eos": True}


@dataclasses.dataclass
class Result:
    """What became of one request."""

    kind: str
    sent_s: float
    """Seconds since the run started."""
    code: str = "LOST"
    latency_s: float = 0.0
    verdict: str = "lost"
    details: str = ""
    """The status message, kept for outcomes other than the expected one."""


def verdict(kind: Kind, code: str) -> str:
    if code == kind.expected:
        return "expected"
    if code in DEGRADED:
        return "degraded"
    return "lost" if code == "LOST" else "other"


@dataclasses.dataclass
class Fault:
    """One injected fault and the window of requests it may affect."""

    name: str
    what: str
    start_s: float
    end_s: float = 0.0
    recovered_s: float | None = None
    """Seconds from the fault's end to the first answer of a request sent after it."""
