"""The continuous-batching engine: one thread owns the model and loops schedule, run,
postprocess; callers only add sequences, abort them and read their events.

Each iteration admits waiting sequences that fit (taking the KV blocks of any prefix
already cached), runs this step's prompt chunks, then one batched decode forward for
every sequence past its prompt (growing each by a block when it needs one, preempting
the youngest when the pool is out), samples every row with its request's own
parameters and generator, and streams the text. Sequences join and leave between
steps; cancelling one (or its deadline passing) takes it out before the next step and
gives back its KV blocks without touching the others. A request that could never fit
the pool, or that arrives after shutdown, is refused when it is submitted.

Failures are per sequence. A row that gives no token (NaN or infinite logits, any
error while it is sampled or its text is decoded) ends that sequence alone with its
error; if the batched decode forward itself fails, each of its rows runs again alone,
so only a row that fails by itself fails. Rows read only their own blocks' slots that
hold written positions; a block they share was written from inputs identical to theirs
up to its end (`prefix.py`), so what one sequence computes (NaN keys from NaN features
included) reaches neither its neighbours nor the next holder of its blocks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from hero_core.errors import InvalidInputError
from services.common.errors import UnavailableError
from services.language.batching.blocks import BlockManager
from services.language.batching.kv import KVPool
from services.language.batching.prefix import PrefixKeys
from services.language.batching.runner import ModelRunner
from services.language.batching.scheduler import Policy, PrefillChunk, Scheduler
from services.language.batching.sequence import Sequence, Status
from services.language.config import BatchingConfig
from services.language.decoding import (
    Delta,
    FinishReason,
    NonFiniteLogitsError,
    TextStream,
    generator_for,
    sample_rows,
)
from services.language.engine import EngineObserver, EngineStats, Finished, kv_tokens
from services.language.model import EngineRequest, LanguageModel

log = logging.getLogger("hero.language.batching")


class BatchingEngine:
    """LLaVA-NeXT's language half with iteration-level batching, a paged KV cache with
    prefix reuse, and admission by KV blocks."""

    def __init__(self, model: LanguageModel, settings: BatchingConfig):
        self.model, self.settings = model, settings
        self.info = model.info
        self.observer: EngineObserver | None = None
        shape = model.kv_shape()
        tokens = settings.kv_cache_tokens
        if settings.kv_cache_bytes is not None:
            tokens = settings.kv_cache_bytes // shape.bytes_per_token
        size = settings.block_size
        if tokens < size:
            raise ValueError(f"the KV cache ({tokens} tokens) is smaller than one block "
                             f"(block_size={size})")
        self.pool = KVPool(shape, tokens // size, size, model.device)
        self.blocks = BlockManager(self.pool.num_blocks, size, settings.prefix_cache)
        policy = Policy(settings.max_batch_size, settings.max_prefill_tokens_per_step,
                        settings.max_bypass, settings.kv_allocation == "reserve")
        self.scheduler = Scheduler(self.blocks, policy, model.device)
        self.runner = ModelRunner(model, self.pool)
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._outbox: list[tuple[Sequence, list[Any]]] = []
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # -- the caller's side (any thread, usually the server's event loop) --------------

    def check(self, request: EngineRequest, max_prompt_tokens: int) -> EngineRequest:
        request = self.model.check(request, max_prompt_tokens)
        self._check_fits(self.model.needs(request))
        return request

    def _check_fits(self, needed: int) -> None:
        """Refuse a request whose prompt + max_new_tokens could never fit the pool."""
        if needed > self.pool.capacity:
            raise InvalidInputError(
                f"the request needs {needed} KV tokens (prompt + visual tokens + "
                f"max_new_tokens), above this server's kv_cache_tokens={self.pool.capacity}; "
                "lower max_new_tokens or the retention")

    def stats(self) -> EngineStats:
        running = len(self.scheduler.running)
        waiting = len(self.scheduler.waiting) + len(self._inbox)
        room = 0 if self.scheduler.kv_full else max(0, self.settings.max_batch_size - running)
        blocks = self.blocks
        return EngineStats(running, waiting, room, blocks.held * blocks.block_size,
                           self.pool.capacity, blocks.available, blocks.cached,
                           self.scheduler.preemptions)

    async def stream(self, request: EngineRequest,
                     deadline: float | None = None) -> AsyncIterator[Delta | Finished]:
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[list[Any]] = asyncio.Queue()

        def emit(events: list[Any]) -> None:
            loop.call_soon_threadsafe(outbox.put_nowait, events)

        seq = self._sequence(request, emit, deadline)
        self._submit(seq)
        finished = False
        try:
            while not finished:
                for event in await outbox.get():
                    if isinstance(event, BaseException):
                        finished = True
                        raise event
                    finished = isinstance(event, Finished)
                    yield event
        finally:
            if not finished:
                seq.aborted = True
                self._wake.set()

    def warmup(self) -> None:
        """A two-token generation through the scheduler thread."""
        async def run() -> None:
            async for _ in self.stream(self.model.warmup_request()):
                pass
        asyncio.run(run())

    def shutdown(self) -> None:
        with self._start_lock:  # no sequence gets into the inbox after this
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)

    def _sequence(self, request: EngineRequest, emit: Any, deadline: float | None) -> Sequence:
        ids = self.model.prompt_ids(request)
        prompt = int(ids.numel()) - 1 + request.packed.num_embeddings
        self._check_fits(kv_tokens(prompt, request.params.max_new_tokens))
        text = TextStream(self.model.tokenizer, request.params, self.model.eos_ids)
        keys = PrefixKeys(ids, request.packed, self.model.image_token_id,
                          self.blocks.block_size) if self.blocks.prefix_cache else None
        return Sequence(request, prompt, text, emit, deadline, keys)

    def _submit(self, seq: Sequence) -> None:
        with self._start_lock:
            if self._stopping:
                raise UnavailableError("the language engine is shutting down; retry on "
                                       "another replica")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="hero-batching",
                                                daemon=True)
                self._thread.start()
            self._inbox.append(seq)
        self._wake.set()

    # -- the scheduler thread ---------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._iterate()
            except Exception as exc:  # a bug in the loop itself: fail what it holds, go on
                log.exception("scheduler step failed; ending every sequence it held")
                for seq in self._held():
                    self.scheduler.remove(seq)
                    self._send(seq, [exc])
                self._flush()
        for seq in self._held():
            self._end(seq, "cancelled")
        self._flush()

    def _take_inbox(self) -> None:
        """Move new sequences into the scheduler's waiting queue."""
        while self._inbox:
            self.scheduler.add(self._inbox.popleft())

    def _held(self) -> list[Sequence]:
        """Every sequence the engine holds, new ones included."""
        self._take_inbox()
        return [*self.scheduler.waiting, *self.scheduler.running]

    def _iterate(self) -> None:
        """Admit, prefill, decode: one step of the batch."""
        sched = self.scheduler
        self._take_inbox()
        self._retire_aborted()
        self._flush()
        if sched.idle:
            self._wake.wait()
            self._wake.clear()
            return
        for seq in sched.admit():
            self._guarded([seq], self._admitted, seq)
        for chunk in sched.prefill_chunks():
            self._guarded([chunk.sequence], self._prefill, chunk)
            self._flush()
        preempted = sched.preemptions
        batch = sched.decoding()
        if self.observer is not None:
            for _ in range(sched.preemptions - preempted):
                self.observer.observe_preemption()
        if batch:
            self._guarded(batch, self._decode, batch)

    def _guarded(self, seqs: list[Sequence], work: Any, arg: Any) -> None:
        """Run one model step; if it fails, only the sequences in it fail."""
        try:
            work(arg)
        except Exception as exc:  # handed to the callers, mapped to a status there
            for seq in seqs:
                self._fail(seq, exc)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        """End one sequence with `exc` (the caller raises it; the server maps it to a
        status), unless it has already ended."""
        if seq.status is Status.FINISHED:
            return
        if isinstance(exc, NonFiniteLogitsError):
            log.warning("request %s ends: %s", seq.request.request_id, exc)
        else:
            log.error("request %s failed in the model step", seq.request.request_id,
                      exc_info=exc)
        self.scheduler.remove(seq)
        self._send(seq, [exc])

    def _retire_aborted(self) -> None:
        now = time.monotonic()
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if seq.aborted or seq.expired(now):
                self._guarded([seq], self._cancel, seq)

    def _cancel(self, seq: Sequence) -> None:
        self._end(seq, "cancelled")

    def _admitted(self, seq: Sequence) -> None:
        """Inputs for the positions it must compute; the first time, its queue wait and
        generator (a preempted sequence keeps its generator's state)."""
        if self.observer is not None:
            self.observer.observe_prefix_cache(seq.prefill_target, seq.cached)
        if seq.generator is None:
            seq.admitted_at = time.perf_counter()
            if self.observer is not None:
                self.observer.observe_queue_wait(seq.admitted_at - seq.submitted_at)
            seq.generator = generator_for(seq.request.params)
        if seq.prefill_left > 0:
            seq.embeds = self.model.prompt_embeds(seq.request)
            if seq.generated > 1:  # recomputed after a preemption
                fed = torch.tensor(seq.text.ids[:-1], device=seq.embeds.device)
                seq.embeds = torch.cat([seq.embeds, self.model.token_embeds(fed)])

    def _prefill(self, chunk: PrefillChunk) -> None:
        seq = chunk.sequence
        assert seq.embeds is not None and seq.slots is not None
        last = chunk.end == seq.prefill_target
        first = last and not seq.generated  # the prompt's end: its logits give token 1
        logits = self.runner.prefill(seq.embeds[chunk.start:chunk.end], seq.slots, chunk.start,
                                     first)
        seq.cached = chunk.end
        self.scheduler.written(seq)
        if last:
            seq.embeds, seq.status = None, Status.DECODE
        if logits is not None:
            seq.first_token_at = time.perf_counter()
            self._take(seq, self._sample([seq], logits[None])[0])

    def _decode(self, batch: list[Sequence]) -> None:
        start = time.perf_counter()
        rows, logits = self._forward(batch)
        if rows:
            for seq in rows:
                seq.cached += 1
                self.scheduler.written(seq)
            for seq, outcome in zip(rows, self._sample(rows, logits), strict=True):
                self._take(seq, outcome)
        if self.observer is not None:
            self.observer.observe_step(len(batch), time.perf_counter() - start)

    def _forward(self, batch: list[Sequence]) -> tuple[list[Sequence], torch.Tensor]:
        """The decode logits `(B, V)` of the rows that have them. One batched forward;
        if it fails, each row runs alone (each rewrites the same KV slots) and a row
        that fails alone ends alone."""
        try:
            return batch, self._run_decode(batch)
        except Exception:
            if len(batch) == 1:
                raise
            log.exception("decode step of %d sequences failed; running them one by one",
                          len(batch))
        rows, logits = [], []
        for seq in batch:
            try:
                logits.append(self._run_decode([seq])[0])
                rows.append(seq)
            except Exception as exc:  # this row's own failure
                self._fail(seq, exc)
        return rows, torch.stack(logits) if logits else torch.empty(0)

    def _run_decode(self, rows: list[Sequence]) -> torch.Tensor:
        return self.runner.decode([s.last_token for s in rows], [s.cached for s in rows],
                                  [s.slots for s in rows])  # type: ignore[misc]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int | Exception]:
        """One token per row of `(B, V)` logits, each with its request's parameters; a
        row that gives none has its exception instead."""
        return sample_rows(logits, [s.request.params for s in seqs],
                           [s.generator for s in seqs],  # type: ignore[misc]
                           [len(s.text.ids) for s in seqs])

    def _take(self, seq: Sequence, outcome: int | Exception) -> None:
        """A row's sampled token, or its failure: that sequence alone goes on or ends."""
        if isinstance(outcome, Exception):
            self._fail(seq, outcome)
            return
        try:
            self._accept(seq, outcome)
        except Exception as exc:  # e.g. the tokenizer on this row's token: this row only
            self._fail(seq, exc)

    def _accept(self, seq: Sequence, token: int) -> None:
        """A sampled token: stream its text; end the sequence if it is done."""
        delta = seq.text.add(token)
        seq.last_token = token
        if seq.text.done:
            self._end(seq, None, [delta] if delta is not None else [])
        elif delta is not None:
            self._send(seq, [delta])

    def _end(self, seq: Sequence, reason: FinishReason | None,
             events: list[Any] | None = None) -> None:
        events = list(events or [])
        if (delta := seq.text.finish(reason)) is not None:  # may fail: before removal
            events.append(delta)
        self.scheduler.remove(seq)
        events.append(self._finished(seq))
        self._send(seq, events)

    def _finished(self, seq: Sequence) -> Finished:
        now, n = time.perf_counter(), len(seq.text.ids)
        decode_s = now - seq.first_token_at if seq.first_token_at else 0.0
        admitted = seq.admitted_at or now
        return Finished(
            seq.prompt_length, seq.request.packed.num_embeddings, n,
            (seq.first_token_at - admitted) * 1e3 if seq.first_token_at else 0.0,
            seq.first_token_at, (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            seq.text.reason or "cancelled", (admitted - seq.submitted_at) * 1e3)

    def _send(self, seq: Sequence, events: list[Any]) -> None:
        """Queue events for the caller; `_flush` hands them over once the step's
        bookkeeping (KV, metrics) is done, so a caller never sees an answer end before
        the engine's state and metrics say so."""
        self._outbox.append((seq, events))

    def _flush(self) -> None:
        for seq, events in self._outbox:
            try:
                seq.emit(events)
            except RuntimeError:  # the caller's event loop is gone: nobody is listening
                seq.aborted = True
        self._outbox.clear()
