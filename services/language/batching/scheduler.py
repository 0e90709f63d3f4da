"""Which sequences run in the next step: plain decisions over sequences and KV tokens.

A sequence waits (first come, first served) until the batch has a place
(`max_batch_size`) and the KV pool has room for everything it may need: prompt,
visual tokens and `max_new_tokens`, reserved at admission so a running sequence
never runs out of KV and never has to be preempted. Each step then prefills
admitted prompts, in chunks of at most `max_prefill_tokens_per_step` tokens while
other sequences are decoding (so they stall for one chunk at most; with nobody
decoding a prompt goes in one piece), and decodes every sequence whose prompt is in.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from services.language.batching.kv import KVPool
from services.language.batching.sequence import Sequence, Status


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    sequence: Sequence
    start: int
    end: int


class Scheduler:
    def __init__(self, pool: KVPool, max_batch_size: int, max_prefill_tokens_per_step: int):
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens_per_step = max_prefill_tokens_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv_full = False
        """The last admission stopped at the KV cache, with batch places to spare."""

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into the batch, oldest first, while they fit."""
        admitted = []
        while (self.waiting and len(self.running) < self.max_batch_size
               and self.waiting[0].reserved <= self.pool.available):
            seq = self.waiting.popleft()
            seq.slots = self.pool.allocate(seq.reserved)
            seq.status = Status.PREFILL
            self.running.append(seq)
            admitted.append(seq)
        self.kv_full = bool(self.waiting) and len(self.running) < self.max_batch_size
        return admitted

    def prefill_chunks(self) -> list[PrefillChunk]:
        """This step's prompt chunks, oldest sequence first, within the token budget;
        with nobody decoding, the oldest prompt whole (there is no one to stall)."""
        prefilling = [s for s in self.running if s.status is Status.PREFILL]
        if not prefilling:
            return []
        if not any(s.status is Status.DECODE for s in self.running):
            seq = prefilling[0]
            return [PrefillChunk(seq, seq.cached, seq.prompt_length)]
        chunks, budget = [], self.max_prefill_tokens_per_step
        for seq in prefilling:
            take = min(seq.prefill_left, budget)
            if take <= 0:
                break
            chunks.append(PrefillChunk(seq, seq.cached, seq.cached + take))
            budget -= take
        return chunks

    def decoding(self) -> list[Sequence]:
        return [s for s in self.running if s.status is Status.DECODE]

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out, wherever it is, and give back its KV slots (first, so that
        a reader never sees it gone from the batch with its KV still held)."""
        if seq.slots is not None:
            self.pool.release(seq.slots)
            seq.slots = None
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is not Status.FINISHED:
            self.running.remove(seq)
        seq.status = Status.FINISHED
        seq.embeds = None
