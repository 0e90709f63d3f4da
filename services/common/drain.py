"""Draining a server before it stops, the same way in both services.

On SIGTERM a server stops admitting calls (new ones get UNAVAILABLE, retryable), lets
the calls it runs finish within a grace period, and then ends the calls still running
itself, with UNAVAILABLE and a message saying why: grpc would otherwise cancel them,
and a client cannot tell a CANCELLED call from one it cancelled. `Drain` holds that
state for one event loop:

    with drain.admit():                     # UnavailableError once draining began
        async for event in drain.until_expired(events):
            ...                             # UnavailableError once the grace is over
    drain.begin(); await drain.wait_idle(grace_s) or drain.expire()
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import contextmanager
from typing import TypeVar

from services.common.errors import UnavailableError
from services.common.tasks import cancel_and_wait

T = TypeVar("T")


async def _step(events: AsyncIterator[T]) -> T:
    return await anext(events)


class Drain:
    """Whether a server still admits calls, how many run, and whether their grace is over.

    `refusal` is the message a call refused while draining gets; `expiry` the message of
    a call ended because the grace ran out. Both travel with UNAVAILABLE."""

    def __init__(self, refusal: str = "the server is shutting down (draining); retry",
                 expiry: str = "the server is shutting down and this call ran past its "
                               "drain period; retry"):
        self.refusal, self.expiry = refusal, expiry
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._expired = asyncio.Event()

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    def begin(self) -> None:
        """Refuse new calls from now on (idempotent)."""
        self.draining = True

    def expire(self, expiry: str | None = None) -> None:
        """End the calls still running at their next event, with `expiry` (when given)
        as their message."""
        self.begin()
        if expiry is not None:
            self.expiry = expiry
        self._expired.set()

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count one call while it runs; `UnavailableError` when draining began."""
        if self.draining:
            raise UnavailableError(self.refusal)
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no admitted call runs, at most `timeout_s`; whether none does."""
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def until_expired(self, events: AsyncIterator[T]) -> AsyncGenerator[T, None]:
        """`events`, until the grace expires: then `UnavailableError(expiry)` instead of
        the next event. `events` is advanced in a task of its own, so the wait for its next
        event can be abandoned; it is cancelled and waited for, not left running, when this
        ends."""
        expired = asyncio.ensure_future(self._expired.wait())
        step: asyncio.Task[T] | None = None
        try:
            while True:
                step = asyncio.ensure_future(_step(events))
                await asyncio.wait((step, expired), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    raise UnavailableError(self.expiry)
                try:
                    event = step.result()
                except StopAsyncIteration:
                    return
                step = None
                yield event
        finally:
            expired.cancel()
            if step is not None:
                await cancel_and_wait(step)
