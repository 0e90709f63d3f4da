"""Admission at the door: the engine runs what fits, at most `queue` more may wait.

A request takes a place when its header arrives, before its tokens are uploaded, so
a full server refuses at once instead of after the upload. What runs is the engine's
decision (a batch place and KV space, or a slot); everything else waits, and at most
`queue` requests wait beyond the places the engine could still fill right now.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from services.common.errors import OverloadedError


class Occupancy(Protocol):
    @property
    def running(self) -> int:
        """Requests the engine runs now."""

    @property
    def room(self) -> int:
        """Places not taken by running requests (0 while the KV cache keeps one waiting)."""


class Admission:
    """Counts requests from header to end; refuses one when `queue` already wait."""

    def __init__(self, queue: int, occupancy: Callable[[], Occupancy],
                 describe: Callable[[], str] = lambda: ""):
        if queue < 0:
            raise ValueError("queue must be >= 0")
        self.queue, self.occupancy, self.describe = queue, occupancy, describe
        self.reserved = 0

    @property
    def waiting(self) -> int:
        return max(0, self.reserved - self.occupancy().running)

    def reserve(self) -> Ticket:
        waiting = self.waiting
        if waiting >= self.queue + self.occupancy().room:
            raise OverloadedError(f"server is full: {waiting} requests wait for room "
                                  f"(max_queue={self.queue}){self.describe()}; retry with "
                                  "backoff")
        self.reserved += 1
        return Ticket(self)


class Ticket:
    """One admitted request's place; `release()` it when the request ends (idempotent)."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.admission.reserved -= 1
