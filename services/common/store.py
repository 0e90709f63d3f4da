"""Bytes-only key-value storage under the token cache, chosen by URL scheme.

`redis://` and `rediss://` (TLS) use Redis; `memory://` keeps an in-process LRU for
development. One value per key: a cache value is written and evicted whole.

A failure is a `StoreError` (`services.common.store_errors`) that says what went wrong
in an operator's terms and which kind of failure it is, for metrics and health.

The lock replicas take while one of them produces a value is a separate helper
(`services.common.locks`).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from services.common.store_errors import REASONS, RedisEndpoint, StoreError, diagnose

__all__ = ["REASONS", "MemoryStore", "RedisStore", "Store", "StoreError", "open_store"]
T = TypeVar("T")

class Store(Protocol):
    """What a backend offers the cache: bytes by key, with a lifetime."""

    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: float | None) -> None: ...
    async def exists(self, key: str) -> bool: ...
    async def delete(self, key: str) -> None:
        """Drop a value (one found unusable)."""
    async def ping(self) -> None:
        """Whether the backend answers (health checks)."""
    async def close(self) -> None: ...


class RedisStore:
    """Redis via redis.asyncio (hiredis parser), with per-call timeouts."""

    def __init__(self, url: str, timeout_s: float, connect_timeout_s: float,
                 password: str | None = None, tls_ca_file: str | None = None):
        import redis.asyncio as aioredis

        self._errors = (aioredis.RedisError, OSError, asyncio.TimeoutError)
        extra: dict[str, object] = {}
        if password:
            extra["password"] = password
        if tls_ca_file and url.startswith("rediss://"):
            extra["ssl_ca_certs"] = tls_ca_file
        self.client = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s,
            retry_on_timeout=False, health_check_interval=30, **extra)
        self.timeout_s = timeout_s
        self.endpoint = RedisEndpoint.of(url, bool(password), timeout_s)
        self.answered = False
        """Whether the server has answered a call."""

    async def call(self, op: Awaitable[T]) -> T:
        """Await one redis-py operation within the timeout; its failure as `StoreError`."""
        try:
            result = await asyncio.wait_for(op, self.timeout_s)
        except self._errors as exc:
            raise diagnose(exc, self.endpoint, self.answered) from exc
        self.answered = True
        return result

    async def get(self, key: str) -> bytes | None:
        value: Any = await self.call(self.client.get(key))
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl_s: float | None) -> None:
        px = int(ttl_s * 1000) if ttl_s else None
        await self.call(self.client.set(key, value, px=px))

    async def exists(self, key: str) -> bool:
        return bool(await self.call(self.client.exists(key)))

    async def delete(self, key: str) -> None:
        await self.call(self.client.delete(key))

    async def ping(self) -> None:
        await self.call(self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


class MemoryStore:
    """In-process LRU bounded in bytes, with TTLs; for development and single replicas."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self.items: collections.OrderedDict[str, tuple[bytes, float]] = collections.OrderedDict()
        self.size = 0

    async def get(self, key: str) -> bytes | None:
        item = self.items.get(key)
        if item is None:
            return None
        if item[1] and item[1] < time.monotonic():
            await self.delete(key)
            return None
        self.items.move_to_end(key)
        return item[0]

    async def set(self, key: str, value: bytes, ttl_s: float | None) -> None:
        await self.delete(key)
        self.items[key] = (value, time.monotonic() + ttl_s if ttl_s else 0.0)
        self.size += len(value)
        while self.size > self.max_bytes and self.items:
            _, (old, _) = self.items.popitem(last=False)
            self.size -= len(old)

    async def exists(self, key: str) -> bool:
        return await self.get(key) is not None

    async def delete(self, key: str) -> None:
        item = self.items.pop(key, None)
        if item is not None:
            self.size -= len(item[0])

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self.items.clear()
        self.size = 0


def open_store(url: str, timeout_s: float = 0.25, connect_timeout_s: float = 0.5,
               password: str | None = None, tls_ca_file: str | None = None) -> Store:
    """The store for `url`: redis://host:port/db, rediss://..., or memory://. A password
    given here (from a secret) wins over none in the URL; it never appears in logs."""
    scheme = urlparse(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, timeout_s, connect_timeout_s, password, tls_ca_file)
    if scheme == "memory":
        return MemoryStore()
    raise ValueError(f"unsupported cache URL scheme {scheme!r}; use redis://, rediss:// or "
                     "memory://")
