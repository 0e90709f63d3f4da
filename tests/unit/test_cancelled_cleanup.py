"""The stream wrappers that advance their source in a task of their own (`coalesce`,
`Drain.until_expired`) finish closing that source before they end, even when the call
is cancelled again while they close it (a deadline's cancel on top of a client's, or
gRPC cancelling a handler that is already ending). Otherwise the caller's own
`aclose()` of the source finds it still running in the abandoned task: RuntimeError,
reported as INTERNAL instead of CANCELLED."""

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


@pytest.mark.parametrize("stack", list(STACKS))
def test_a_second_cancel_while_closing_waits_for_the_source_to_close(stack):
    closed = []

    async def source():
        try:
            yield "first"
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.1)  # letting go takes a moment, as an engine's may
            closed.append(True)

    async def consume(got):
        async with contextlib.aclosing(source()) as stream, \
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
