"""One sequence at a time per slot: the reference engine the batched one is measured against.

Each admitted request gets a worker thread and runs its own prefill and its own
forward per generated token, with a `DynamicCache` of its own. `slots` requests run
at once (each in its own thread, competing for the same cores); the rest wait. Tokens
are chosen by the same `sample` as the batched engine's; a request whose logits go NaN
or infinite ends with `NonFiniteLogitsError`, the other slots unaffected.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from services.language.decoding import Delta, TextStream, generator_for, sample
from services.language.engine import EngineObserver, EngineStats, Finished
from services.language.model import EngineRequest, LanguageModel

_DONE = object()


class SequentialEngine:
    """The projector, image_newline and LLM of a checkpoint, one request per slot."""

    def __init__(self, model: LanguageModel, slots: int = 1):
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.model = model
        self.info = model.info
        self.observer: EngineObserver | None = None
        self.slots = slots
        self.executor = ThreadPoolExecutor(slots, "hero-generate")
        self._semaphore: asyncio.Semaphore | None = None
        self._running = 0
        self._waiting = 0

    def check(self, request: EngineRequest, max_prompt_tokens: int) -> EngineRequest:
        return self.model.check(request, max_prompt_tokens)

    def stats(self) -> EngineStats:
        return EngineStats(self._running, self._waiting, max(0, self.slots - self._running))

    @torch.inference_mode()
    def generate(self, request: EngineRequest,
                 cancelled: Callable[[], bool]) -> Iterator[Delta | Finished]:
        """Run one request to the end (blocking)."""
        m, params = self.model, request.params
        if cancelled():  # closed, or past its deadline, while it waited for a slot
            yield Finished(m.prompt_tokens(request), request.packed.num_embeddings, 0, 0.0,
                           0.0, 0.0, "cancelled")
            return
        embeds = m.prompt_embeds(request)[None]
        generator = generator_for(params)
        start = time.perf_counter()
        out = m.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        prefill_ms = (time.perf_counter() - start) * 1e3
        text = TextStream(m.tokenizer, params, m.eos_ids)
        first_at = 0.0
        while True:
            token = sample(out.logits[0, -1], params, generator, len(text.ids))
            first_at = first_at or time.perf_counter()
            if (delta := text.add(token)) is not None:
                yield delta
            if text.done or cancelled():
                break
            next_ids = torch.tensor([[token]], device=m.device)
            out = m.model(input_ids=next_ids, past_key_values=out.past_key_values,
                          use_cache=True)
        if (delta := text.finish("cancelled")) is not None:
            yield delta
        decode_s = time.perf_counter() - first_at
        n = len(text.ids)
        tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
        yield Finished(embeds.shape[1], request.packed.num_embeddings, n, prefill_ms, first_at,
                       tps, text.reason or "length")

    async def stream(self, request: EngineRequest,
                     deadline: float | None = None) -> AsyncIterator[Delta | Finished]:
        """`generate` in a worker thread once a slot is free; stopped when the caller
        closes the stream or the deadline passes."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.slots)
        submitted = time.perf_counter()
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        queue_s = time.perf_counter() - submitted
        if self.observer is not None:
            self.observer.observe_queue_wait(queue_s)
        try:
            async for event in self._in_thread(request, deadline):
                if isinstance(event, Finished):
                    event.queue_ms = queue_s * 1e3
                yield event
        finally:
            self._running -= 1
            self._semaphore.release()

    async def _in_thread(self, request: EngineRequest,
                         deadline: float | None) -> AsyncIterator[Delta | Finished]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def should_stop() -> bool:
            return stop.is_set() or (deadline is not None and time.monotonic() >= deadline)

        def work() -> None:
            try:
                for event in self.generate(request, should_stop):
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except BaseException as exc:  # handed to the event loop, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        future = loop.run_in_executor(self.executor, work)
        try:
            while (event := await queue.get()) is not _DONE:
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            stop.set()
            # The slot is free only once the worker has really stopped (<= one step).
            await asyncio.shield(future)

    def warmup(self) -> None:
        for _ in self.generate(self.model.warmup_request(), lambda: False):
            pass

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
