"""One request's state inside the batching engine."""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable
from typing import Any

import torch

from services.language.decoding import TextStream
from services.language.engine import EngineRequest, kv_tokens


class Status(enum.Enum):
    WAITING = "waiting"
    """Submitted; waits for a batch place and KV space."""
    PREFILL = "prefill"
    """Admitted; its prompt is being written to the KV cache, chunk by chunk."""
    DECODE = "decode"
    """In the decode batch: one token per step."""
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request, the KV slots it owns, and its answer so far.

    Only the scheduler thread changes a sequence, except `aborted`, which the caller's
    thread sets to ask the scheduler to end it.
    """

    request: EngineRequest
    prompt_length: int
    """Tokens of the LLM's input: text plus visual embeddings."""
    text: TextStream
    emit: Callable[[list[Any]], None]
    """Hands events (deltas, one `Finished`, or an exception) to the caller's thread."""
    deadline: float | None = None
    """`time.monotonic()` after which the sequence ends as cancelled."""
    status: Status = Status.WAITING
    embeds: torch.Tensor | None = None
    """Prompt embeddings `(prompt_length, H)`, made at admission, dropped after prefill."""
    slots: torch.Tensor | None = None
    """KV slots `(reserved,)` owned while admitted."""
    cached: int = 0
    """Tokens whose keys and values are in the KV cache."""
    last_token: int = -1
    """The sampled token the next decode step feeds in."""
    generator: torch.Generator | None = None
    aborted: bool = False
    submitted_at: float = dataclasses.field(default_factory=time.perf_counter)
    admitted_at: float = 0.0
    first_token_at: float = 0.0

    @property
    def reserved(self) -> int:
        """KV tokens this sequence may ever need: prompt, visual tokens, max_new_tokens."""
        return kv_tokens(self.prompt_length, self.request.params.max_new_tokens)

    @property
    def prefill_left(self) -> int:
        return self.prompt_length - self.cached

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline
