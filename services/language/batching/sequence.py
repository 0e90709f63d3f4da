"""One request's state inside the batching engine."""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable
from typing import Any

import torch

from services.language.batching.prefix import PrefixKeys
from services.language.decoding import TextStream
from services.language.engine import EngineRequest, kv_tokens


class Status(enum.Enum):
    WAITING = "waiting"
    """Submitted (or preempted); waits for a batch place and KV blocks."""
    PREFILL = "prefill"
    """Admitted; its prompt is being written to the KV cache, chunk by chunk."""
    DECODE = "decode"
    """In the decode batch: one token per step."""
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request, the KV blocks it holds, and its answer so far.

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
    keys: PrefixKeys | None = None
    """Its inputs and block hashes (None: it takes no part in prefix reuse)."""
    status: Status = Status.WAITING
    embeds: torch.Tensor | None = None
    """Input embeddings `(prefill_target, H)`, made at admission, dropped after prefill."""
    blocks: list[int] = dataclasses.field(default_factory=list)
    """Its block table: the KV blocks of its positions, in order."""
    slots: torch.Tensor | None = None
    """KV slot `(len(blocks) * block_size,)` of each position its blocks cover."""
    cached: int = 0
    """Tokens whose keys and values are in the KV cache."""
    registered: int = 0
    """Full blocks whose hashes were offered to the prefix cache."""
    last_token: int = -1
    """The sampled token the next decode step feeds in."""
    generator: torch.Generator | None = None
    aborted: bool = False
    bypassed: int = 0
    """Sequences admitted past this one while it waited."""
    preemptions: int = 0
    submitted_at: float = dataclasses.field(default_factory=time.perf_counter)
    admitted_at: float = 0.0
    first_token_at: float = 0.0

    @property
    def generated(self) -> int:
        """Tokens sampled so far (each is fed back at the next position)."""
        return len(self.text.ids)

    @property
    def prefill_target(self) -> int:
        """Positions a prefill writes: the prompt, and after a preemption also every
        generated token but the last (which the next decode step feeds in)."""
        return self.prompt_length + max(0, self.generated - 1)

    @property
    def prefill_left(self) -> int:
        return self.prefill_target - self.cached

    @property
    def most_tokens(self) -> int:
        """KV tokens this sequence may ever hold: prompt, visual tokens, max_new_tokens."""
        return kv_tokens(self.prompt_length, self.request.params.max_new_tokens)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline
