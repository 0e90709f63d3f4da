"""The stream wrappers that advance their source in a task of their own (`coalesce`,
`Drain.until_expired`) close that source when their consumer is cancelled, and finish
closing it before they end, even when the call is cancelled again while they close it
(a deadline's cancel on top of a client's, or gRPC cancelling a handler that is already
ending). Otherwise the caller's own `aclose()` of the source finds it still running in
the abandoned task: RuntimeError, reported as INTERNAL instead of CANCELLED."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from services.common.coalesce import coalesce
from services.common.drain import Drain


def no_merge(first, then):
    return None


STACKS = {
    "coalesce": lambda stream: coalesce(stream, no_merge),
    "until_expired": lambda stream: Drain().until_expired(stream),
    "until_expired then coalesce": lambda stream: coalesce(Drain().until_expired(stream),
                                                           no_merge),
}


async def stalled(closed: list[bool], closing_s: float = 0.0):
    """One item, then nothing until it is closed; letting go takes `closing_s` (as an
    engine's may), then `closed` gets True."""
    try:
        yield "first"
        await asyncio.Event().wait()
    finally:
        await asyncio.sleep(closing_s)
        closed.append(True)


@pytest.mark.parametrize("stack", list(STACKS))
def test_cancelling_the_consumer_closes_the_source(stack):
    closed: list[bool] = []

    async def consume():
        async for _ in STACKS[stack](stalled(closed)):  # nothing else closes the source
            pass

    async def main():
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return closed

    assert asyncio.run(main()) == [True]


@pytest.mark.parametrize("stack", list(STACKS))
def test_a_second_cancel_while_closing_waits_for_the_source_to_close(stack):
    closed: list[bool] = []

    async def consume(got):
        async with contextlib.aclosing(stalled(closed, closing_s=0.1)) as stream, \
                contextlib.aclosing(STACKS[stack](stream)) as events:
            async for item in events:
                got.append(item)

    async def main():
        got = []
        task = asyncio.create_task(consume(got))
        while not got:
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.sleep(0.02)  # closing: the source is in its `finally`
        assert not task.done() and not closed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return closed

    assert asyncio.run(main()) == [True]
