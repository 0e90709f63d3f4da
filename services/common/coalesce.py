"""Coalescing a stream of text deltas: fewer, larger messages when the writer falls behind.

Every streamed token is one message on each hop of the relay (language engine ->
language service -> vision pipeline -> Serve proxy -> client), and each message costs
the same whatever it carries. `coalesce` reads its source in a task of its own and
hands the writer, whenever it asks for the next item, everything that arrived
meanwhile, merged into one. A writer that keeps up gets every delta as it comes (no
delay); one that falls behind sends one message per turn instead of one per token.

`interval_s` (vLLM's `--stream-interval`, in time) lets the writer wait a little for
more before sending: a delta that finds the writer free is held at most `interval_s`
(the first one of a stream never, so time to first token is unchanged). 0: never held.

The merge is lossless: `merge(a, b)` gives one item equal to `a` then `b` (text and
token ids concatenated), or None when `b` cannot join `a` (a final usage message),
which then follows on its own. An error of the source (a CancelledError it raises
itself included) comes after every item read before it; closing the coalesced stream
cancels the reader, which closes the source, and waits until it has (also when the
closing call is cancelled meanwhile).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

from services.common.tasks import cancel_and_wait

T = TypeVar("T")


async def coalesce(source: AsyncIterator[T], merge: Callable[[T, T], T | None],
                   interval_s: float = 0.0) -> AsyncGenerator[T, None]:
    """`source`'s items, consecutive mergeable ones merged while the caller is busy (and
    for up to `interval_s` after the first of them, except a stream's first item)."""
    if interval_s < 0:
        raise ValueError("interval_s must be >= 0")
    pending: collections.deque[T] = collections.deque()
    arrived = asyncio.Event()
    ended: list[BaseException | None] = []  # [error or None] once the source is done

    async def read() -> None:
        try:
            async for item in source:
                pending.append(item)
                arrived.set()
            ended.append(None)
        except asyncio.CancelledError as exc:
            reader_task = asyncio.current_task()
            if reader_task is not None and reader_task.cancelling():
                raise  # the coalesced stream was closed
            ended.append(exc)  # the source raised it (grpc.aio's self-cancel): handed on
        except Exception as exc:  # handed to the writer after the items before it
            ended.append(exc)
        finally:
            arrived.set()

    loop = asyncio.get_running_loop()
    reader = asyncio.ensure_future(read())
    first = True
    try:
        while True:
            while not pending and not ended:
                arrived.clear()
                await arrived.wait()
            if not pending:
                if ended[0] is not None:
                    raise ended[0]
                return
            item = pending.popleft()
            if interval_s > 0 and not first:
                item = await _hold(item, pending, arrived, ended, merge,
                                   loop.time() + interval_s)
            first = False
            yield _merged(item, pending, merge)
    finally:
        await cancel_and_wait(reader)  # nothing when it has finished


async def _hold(item: T, pending: collections.deque[T], arrived: asyncio.Event,
                ended: list[BaseException | None], merge: Callable[[T, T], T | None],
                until: float) -> T:
    """`item` merged with what arrives before `until`; it stops waiting early when the
    source ends or sends something that cannot be merged."""
    loop = asyncio.get_running_loop()
    while True:
        item = _merged(item, pending, merge)
        if pending:  # what follows cannot join it
            return item
        left = until - loop.time()
        if ended or left <= 0:
            return item
        arrived.clear()
        try:
            await asyncio.wait_for(arrived.wait(), left)
        except TimeoutError:
            return item


def _merged(item: T, pending: collections.deque[T], merge: Callable[[T, T], T | None]) -> T:
    """`item` merged with the pending items that can join it, taken off `pending`."""
    while pending:
        merged = merge(item, pending[0])
        if merged is None:
            break
        pending.popleft()
        item = merged
    return item
