"""The token cache: a store plus the policy around it.

* A store failure or timeout is a miss: logged, counted, never a failed request.
* Values above `max_entry_bytes` are not stored.
* Concurrent misses on one key run the producer once (single flight); the others
  wait for its result.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from hero_core.errors import CorruptPayloadError
from services.common.store import Store, StoreError

T = TypeVar("T")

log = logging.getLogger("hero.vision.cache")


class CacheMetrics(Protocol):
    def observe(self, event: str) -> None:
        """Count one event: hit, miss, coalesced, corrupt, error_get, error_set, too_large."""


class CountingMetrics:
    """Plain counters, for use outside a metrics system (CLI, tests of the policy)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def observe(self, event: str) -> None:
        self.counts[event] = self.counts.get(event, 0) + 1


class TokenCache:
    """get / put / get_or_create over a `Store`, degrading to misses on failure."""

    def __init__(self, store: Store, metrics: CacheMetrics, ttl_s: float | None,
                 max_entry_bytes: int):
        self.store, self.metrics = store, metrics
        self.ttl_s, self.max_entry_bytes = ttl_s, max_entry_bytes
        self._inflight: dict[str, asyncio.Future[bytes]] = {}

    async def get(self, key: str) -> bytes | None:
        try:
            return await self.store.get(key)
        except StoreError as exc:
            self.metrics.observe("error_get")
            log.warning("cache get failed, serving as a miss: %s", exc)
            return None

    async def put(self, key: str, value: bytes) -> bool:
        if len(value) > self.max_entry_bytes:
            self.metrics.observe("too_large")
            return False
        try:
            await self.store.set(key, value, self.ttl_s)
            return True
        except StoreError as exc:
            self.metrics.observe("error_set")
            log.warning("cache set failed, value not stored: %s", exc)
            return False

    async def invalidate(self, key: str) -> None:
        """Drop a value found unusable (corrupt or from another version)."""
        try:
            await self.store.delete(key)
        except StoreError as exc:
            log.warning("cache delete failed: %s", exc)

    async def get_or_create(self, key: str, create: Callable[[], Awaitable[bytes]],
                            decode: Callable[[bytes], T]) -> tuple[T, bool]:
        """The decoded value under `key`, and whether it came from the store.

        A stored value that `decode` rejects (`CorruptPayloadError`: truncated, another
        format version, another method) is counted, dropped and rebuilt: never served.
        """
        value = await self.get(key)
        if value is not None:
            try:
                decoded = decode(value)
                self.metrics.observe("hit")
                return decoded, True
            except CorruptPayloadError as exc:
                self.metrics.observe("corrupt")
                log.warning("dropping unusable cache entry %s: %s", key, exc)
                await self.invalidate(key)
        pending = self._inflight.get(key)
        if pending is not None:
            self.metrics.observe("coalesced")
            return decode(await asyncio.shield(pending)), False
        self.metrics.observe("miss")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value = await create()
            future.set_result(value)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        finally:
            del self._inflight[key]
        await self.put(key, value)
        return decode(value), False
