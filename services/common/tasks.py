"""Ending a helper task for good."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it has ended, also when the caller is cancelled while
    it waits (a deadline's cancel on top of a client's): the task finishes closing what
    it iterates first, so nothing it held is still in use when the caller goes on (an
    async generator still running in an abandoned task cannot be closed). The caller's
    cancellation is raised after that."""
    task.cancel()
    interrupted = False
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError
