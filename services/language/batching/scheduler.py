"""Which sequences run in the next step: plain decisions over sequences and KV blocks.

Admission. A waiting sequence is admitted when the batch has a place
(`max_batch_size`) and the pool has the blocks of its prompt that the prefix cache does
not already hold (with `reserve`, of its prompt and `max_new_tokens`: no growth, no
preemption). While other sequences run, a few blocks stay back (`watermark`) for them
to grow into. Waiting sequences are considered oldest first; one that does not fit yet
is passed by later ones that do, but by at most `max_bypass` of them: after that,
nothing behind it is admitted before it. Since no new sequence then takes KV, it is
admitted at the latest when the sequences running at that moment (and any older ones
waiting ahead of it, bounded alike) have ended, each within its max_new_tokens decode
steps: a large request waits for at most `max_bypass` admissions plus one drain of the
batch. `max_bypass=0` is first come, first served.

Growth and preemption. A decoding sequence takes a new block when its next token
starts one. When the pool has none left, the youngest running sequence (latest
arrival) is preempted, as vLLM does: its blocks go back (those holding a known prefix
stay cached, so it usually finds them again), it returns to the front of the queue
with its answer so far, and on readmission its prompt and generated tokens are
prefilled again before it decodes on. Preempting by arrival means the oldest sequence
always progresses, and since every admitted sequence fits the pool alone, every
sequence finishes.

Each step then prefills admitted prompts, in chunks of at most
`max_prefill_tokens_per_step` tokens while other sequences are decoding (so they stall
for one chunk at most; with nobody decoding a prompt goes in one piece), and decodes
every sequence whose prompt is in.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import torch

from services.language.batching.blocks import BlockManager
from services.language.batching.sequence import Sequence, Status


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    sequence: Sequence
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Policy:
    max_batch_size: int
    max_prefill_tokens_per_step: int
    max_bypass: int = 16
    reserve: bool = False
    """Take the blocks of prompt + max_new_tokens at admission (no growth, no preemption)."""


class Scheduler:
    def __init__(self, blocks: BlockManager, policy: Policy, device: str | torch.device = "cpu"):
        self.blocks, self.policy, self.device = blocks, policy, torch.device(device)
        self.max_batch_size = policy.max_batch_size
        self.watermark = max(1, blocks.num_blocks // 100)
        """Blocks admission leaves free while others run, for them to grow into."""
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv_full = False
        """The last admission stopped at the KV cache, with batch places to spare."""
        self.preemptions = 0

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    # -- admission ---------------------------------------------------------------------

    def admit(self) -> list[Sequence]:
        """Move waiting sequences that fit into the batch, oldest first, passing one that
        does not fit at most `max_bypass` times."""
        admitted: list[Sequence] = []
        passed: list[Sequence] = []
        for seq in list(self.waiting):
            if len(self.running) >= self.max_batch_size:
                break
            plan = self._plan(seq)
            if plan is None:
                if seq.bypassed >= self.policy.max_bypass:
                    break
                passed.append(seq)
                continue
            self._start(seq, *plan)
            admitted.append(seq)
            for earlier in passed:
                earlier.bypassed += 1
            if any(earlier.bypassed >= self.policy.max_bypass for earlier in passed):
                break
        self.kv_full = bool(self.waiting) and len(self.running) < self.max_batch_size
        return admitted

    def cacheable_blocks(self, seq: Sequence) -> int:
        """Full blocks of `seq` the prefix cache may supply: all of its prefill, except
        that a first prefill computes at least its last token (for the first logits)."""
        target = seq.prefill_target
        return (target if seq.generated else target - 1) // self.blocks.block_size

    def _plan(self, seq: Sequence) -> tuple[list[int], int] | None:
        """The cached blocks `seq` can take and how many new ones it needs, if it fits."""
        hits: list[int] = []
        if self.blocks.prefix_cache and seq.keys is not None:
            hashes = seq.keys.upto(self.cacheable_blocks(seq), seq.text.ids)
            hits = self.blocks.lookup(hashes)
        tokens = seq.most_tokens if self.policy.reserve else seq.prefill_target
        new = self.blocks.blocks_for(tokens) - len(hits)
        spare = self.watermark if self.running and not self.policy.reserve else 0
        if new + spare > self.blocks.room_for(hits):
            return None
        return hits, new

    def _start(self, seq: Sequence, hits: list[int], new: int) -> None:
        self.waiting.remove(seq)
        seq.blocks = self.blocks.take(hits, new)
        seq.slots = self._slots(seq.blocks)
        seq.cached, seq.registered = len(hits) * self.blocks.block_size, len(hits)
        seq.status = Status.PREFILL if seq.prefill_left > 0 else Status.DECODE
        self.running.append(seq)

    def _slots(self, blocks: list[int]) -> torch.Tensor:
        size = self.blocks.block_size
        first = torch.tensor(blocks, dtype=torch.long) * size
        slots = (first[:, None] + torch.arange(size)).flatten()
        return slots.to(self.device)

    # -- one step ----------------------------------------------------------------------

    def prefill_chunks(self) -> list[PrefillChunk]:
        """This step's prompt chunks, oldest sequence first, within the token budget;
        with nobody decoding, the oldest prompt whole (there is no one to stall)."""
        prefilling = [s for s in self.running if s.status is Status.PREFILL]
        if not prefilling:
            return []
        if not any(s.status is Status.DECODE for s in self.running):
            seq = prefilling[0]
            return [PrefillChunk(seq, seq.cached, seq.prefill_target)]
        chunks, budget = [], self.policy.max_prefill_tokens_per_step
        for seq in prefilling:
            take = min(seq.prefill_left, budget)
            if take <= 0:
                break
            chunks.append(PrefillChunk(seq, seq.cached, seq.cached + take))
            budget -= take
        return chunks

    def decoding(self) -> list[Sequence]:
        """The sequences that decode this step, each with a block for its next token;
        when the pool runs out, the youngest running sequences are preempted."""
        order = sorted(self.running, key=lambda s: s.submitted_at)  # oldest first, stable
        batch = []
        for seq in order:
            if seq.status is not Status.DECODE:  # prefilling, or preempted for an older one
                continue
            if seq.cached >= len(seq.blocks) * self.blocks.block_size:
                while not self.blocks.available and seq.status is Status.DECODE:
                    self.preempt(next(s for s in reversed(order) if s in self.running))
                if seq.status is not Status.DECODE:
                    continue
                self._grow(seq)
            batch.append(seq)
        return batch

    def _grow(self, seq: Sequence) -> None:
        (block,) = self.blocks.take([], 1)
        seq.blocks.append(block)
        assert seq.slots is not None
        seq.slots = torch.cat([seq.slots, self._slots([block])])

    def preempt(self, seq: Sequence) -> None:
        """Give back a running sequence's blocks and queue it first, to be recomputed."""
        self._release(seq)
        self.running.remove(seq)
        seq.status, seq.embeds = Status.WAITING, None
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def written(self, seq: Sequence) -> None:
        """`seq`'s KV now holds `cached` tokens: offer its newly full blocks to the
        prefix cache."""
        full = seq.cached // self.blocks.block_size
        if not self.blocks.prefix_cache or seq.keys is None or full <= seq.registered:
            return
        hashes = seq.keys.upto(full, seq.text.ids)
        for i in range(seq.registered, full):
            self.blocks.register(seq.blocks[i], hashes[i])
        seq.registered = full

    def _release(self, seq: Sequence) -> None:
        if seq.blocks:
            self.blocks.release(seq.blocks)
        seq.blocks, seq.slots, seq.cached, seq.registered = [], None, 0, 0

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out, wherever it is, and give back its KV blocks (first, so that
        a reader never sees it gone from the batch with its KV still held)."""
        self._release(seq)
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is not Status.FINISHED:
            self.running.remove(seq)
        seq.status = Status.FINISHED
        seq.embeds = None
