"""`services.common.drain.Drain`: refusal while draining, waiting for running calls, and
ending the calls that outlive the grace, with a retryable status."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from services.common.drain import Drain
from services.common.errors import UnavailableError, status_for


class Source:
    """An endless event stream that records whether it was closed (and how)."""

    def __init__(self):
        self.closed = False
        self.sent = 0

    async def events(self):
        try:
            while True:
                await asyncio.sleep(0.01)
                self.sent += 1
                yield self.sent
        finally:
            self.closed = True


def test_calls_are_refused_with_unavailable_once_draining_began():
    drain = Drain(refusal="leaving; retry")
    with drain.admit():
        assert drain.in_flight == 1
    drain.begin()
    with pytest.raises(UnavailableError) as info, drain.admit():
        pass
    assert status_for(info.value, "r") == (grpc.StatusCode.UNAVAILABLE, "leaving; retry")
    assert drain.in_flight == 0


def test_wait_idle_returns_when_the_last_call_ends():
    async def scenario():
        drain = Drain()

        async def call(seconds):
            with drain.admit():
                await asyncio.sleep(seconds)

        task = asyncio.create_task(call(0.2))
        await asyncio.sleep(0)
        drain.begin()
        assert not await drain.wait_idle(0.05)
        assert await drain.wait_idle(5)
        await task
        assert drain.in_flight == 0

    asyncio.run(scenario())


def test_events_pass_through_until_the_grace_expires_then_unavailable():
    async def scenario():
        drain, source = Drain(), Source()
        seen = []

        async def consume():  # as the services do: the source is closed however it ends
            async with contextlib.aclosing(source.events()) as events:
                async for event in drain.until_expired(events):
                    seen.append(event)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        assert seen == list(range(1, len(seen) + 1)) and seen
        drain.expire("grace over; retry")
        with pytest.raises(UnavailableError, match="grace over; retry"):
            await task
        assert source.closed  # the stream is not left running
        return len(seen), source.sent

    seen, sent = asyncio.run(scenario())
    assert sent - seen <= 1


def test_a_finished_stream_ends_normally():
    """(A cancelled consumer closing its stream: tests/unit/test_cancelled_cleanup.py.)"""
    async def finite():
        for i in range(3):
            yield i

    async def scenario():
        return [e async for e in Drain().until_expired(finite())]

    assert asyncio.run(scenario()) == [0, 1, 2]
