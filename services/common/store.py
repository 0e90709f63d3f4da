"""Bytes-only key-value storage under the token cache, chosen by URL scheme.

`redis://` and `rediss://` (TLS) use Redis; `memory://` keeps an in-process LRU for
development. One value per key: a cache value is written and evicted whole.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Protocol
from urllib.parse import urlparse


class StoreError(Exception):
    """The storage backend failed or timed out (callers treat it as a miss)."""


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: float | None) -> None: ...
    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool: ...
    async def exists(self, key: str) -> bool: ...
    async def delete(self, key: str) -> None: ...
    async def delete_if_equal(self, key: str, value: bytes) -> bool: ...
    async def expire_if_equal(self, key: str, value: bytes, ttl_s: float) -> bool: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


# Compare-and-act on one key, atomic in Redis: a lock is released or extended only by
# the holder whose token it still stores.
DELETE_IF_EQUAL = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0"""
EXPIRE_IF_EQUAL = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0"""


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

    async def _run(self, op):  # type: ignore[no-untyped-def]
        try:
            return await asyncio.wait_for(op, self.timeout_s)
        except self._errors as exc:
            raise StoreError(f"{type(exc).__name__}: {exc}") from exc

    async def get(self, key: str) -> bytes | None:
        value = await self._run(self.client.get(key))
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl_s: float | None) -> None:
        px = int(ttl_s * 1000) if ttl_s else None
        await self._run(self.client.set(key, value, px=px))

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        return bool(await self._run(self.client.set(key, value, px=int(ttl_s * 1000), nx=True)))

    async def exists(self, key: str) -> bool:
        return bool(await self._run(self.client.exists(key)))

    async def delete(self, key: str) -> None:
        await self._run(self.client.delete(key))

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        return bool(await self._run(self.client.eval(DELETE_IF_EQUAL, 1, key, value)))

    async def expire_if_equal(self, key: str, value: bytes, ttl_s: float) -> bool:
        return bool(await self._run(self.client.eval(EXPIRE_IF_EQUAL, 1, key, value,
                                                     int(ttl_s * 1000))))

    async def ping(self) -> None:
        await self._run(self.client.ping())

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

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        if await self.get(key) is not None:
            return False
        await self.set(key, value, ttl_s)
        return True

    async def exists(self, key: str) -> bool:
        return await self.get(key) is not None

    async def delete(self, key: str) -> None:
        item = self.items.pop(key, None)
        if item is not None:
            self.size -= len(item[0])

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        if await self.get(key) != value:
            return False
        await self.delete(key)
        return True

    async def expire_if_equal(self, key: str, value: bytes, ttl_s: float) -> bool:
        if await self.get(key) != value:
            return False
        self.items[key] = (value, time.monotonic() + ttl_s)
        return True

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
