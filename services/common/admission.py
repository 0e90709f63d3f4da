"""Bounded concurrency with a bounded queue: past both, refuse at once."""

from __future__ import annotations

import asyncio
from types import TracebackType

from services.common.errors import OverloadedError


class Admission:
    """`slots` requests run at once and `queue` more may wait; the rest are refused.

    `reserve()` takes a place (running or waiting) immediately or raises
    `OverloadedError`; the returned ticket is an async context manager that waits
    for a slot and gives everything back on exit, cancellation included.
    """

    def __init__(self, slots: int, queue: int):
        if slots < 1 or queue < 0:
            raise ValueError("slots must be >= 1 and queue >= 0")
        self.slots, self.queue = slots, queue
        self._semaphore = asyncio.Semaphore(slots)
        self.reserved = 0
        self.running = 0

    @property
    def waiting(self) -> int:
        return self.reserved - self.running

    def reserve(self) -> Ticket:
        if self.reserved >= self.slots + self.queue:
            raise OverloadedError(f"server is at capacity ({self.slots} running, {self.queue} "
                                  "queued); retry with backoff")
        self.reserved += 1
        return Ticket(self)


class Ticket:
    """One admitted request's place; use `async with ticket:` around the work."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self._holding = False
        self._released = False

    async def __aenter__(self) -> Ticket:
        await self.admission._semaphore.acquire()
        self._holding = True
        self.admission.running += 1
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()

    def release(self) -> None:
        """Give the place back (idempotent); also for tickets that never ran."""
        if self._released:
            return
        self._released = True
        if self._holding:
            self.admission.running -= 1
            self.admission._semaphore.release()
        self.admission.reserved -= 1
