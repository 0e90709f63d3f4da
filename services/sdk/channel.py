"""Channel ownership shared by the asyncio clients."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import grpc


class AsyncChannelClient:
    """Owns one asyncio channel to `target` (TLS when `credentials` are given)."""

    def __init__(self, target: str, *, credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = ()):
        self.channel = (grpc.aio.secure_channel(target, credentials, options=options)
                        if credentials else grpc.aio.insecure_channel(target, options=options))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()
