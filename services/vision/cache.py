"""The token cache: a store plus the policy around it.

* A store failure or timeout is a miss: logged, counted, never a failed request.
* Every value is stored with its own key in front and checked on read, so a value that
  comes back under the wrong key (a desynchronised connection, a bad write) is a miss,
  never another image's tokens.
* Values above `max_entry_bytes` are not stored.
* Concurrent misses on one key run the producer once (single flight): within a
  replica they share one future; across replicas a short-lived lock key in the store
  makes the others poll for the value instead of encoding it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from hero_core.errors import CorruptPayloadError
from services.common.store import Store, StoreError

T = TypeVar("T")
LOCK_SUFFIX = ":lock"

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
                 max_entry_bytes: int, lock_ttl_s: float = 120.0, poll_s: float = 0.025):
        self.store, self.metrics = store, metrics
        self.ttl_s, self.max_entry_bytes = ttl_s, max_entry_bytes
        self.lock_ttl_s, self.poll_s = lock_ttl_s, poll_s
        self._inflight: dict[str, asyncio.Future[bytes]] = {}

    async def get(self, key: str) -> bytes | None:
        try:
            blob = await self.store.get(key)
        except StoreError as exc:
            self.metrics.observe("error_get")
            log.warning("cache get failed, serving as a miss: %s", exc)
            return None
        if blob is None:
            return None
        value = unseal(key, blob)
        if value is None:
            self.metrics.observe("corrupt")
            log.warning("cache value under %s belongs to another key; ignored", key)
        return value

    async def put(self, key: str, value: bytes) -> bool:
        if len(value) > self.max_entry_bytes:
            self.metrics.observe("too_large")
            return False
        try:
            await self.store.set(key, seal(key, value), self.ttl_s)
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
        locked = False
        try:
            locked = await self._lock(key)
            found = None if locked else await self._wait_for_other_replica(key)
            value = found if found is not None else await create()
            if found is None:
                await self.put(key, value)
            future.set_result(value)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        finally:
            del self._inflight[key]
            if locked:
                await self.invalidate(key + LOCK_SUFFIX)
        return decode(value), False

    async def _lock(self, key: str) -> bool:
        """Take the cross-replica lock of `key`; True also when the store is down (then
        there is nobody to coordinate with and this replica just produces)."""
        try:
            return await self.store.set_if_absent(key + LOCK_SUFFIX, b"1", self.lock_ttl_s)
        except StoreError:
            return True

    async def _wait_for_other_replica(self, key: str) -> bytes | None:
        """Poll for the value another replica is producing; None once its lock is gone
        (it failed or finished without storing) or the store fails."""
        try:
            while await self.store.exists(key + LOCK_SUFFIX):
                await asyncio.sleep(self.poll_s)
                value = await self.get(key)
                if value is not None:
                    self.metrics.observe("coalesced")
                    return value
            return await self.get(key)
        except StoreError:
            return None


def seal(key: str, value: bytes) -> bytes:
    """`value` with its key in front: u16 length, key bytes, value."""
    raw = key.encode()
    return len(raw).to_bytes(2, "little") + raw + value


def unseal(key: str, blob: bytes) -> bytes | None:
    """The value of a sealed blob if it was stored under `key`, else None."""
    raw = key.encode()
    if blob[:2] != len(raw).to_bytes(2, "little") or blob[2:2 + len(raw)] != raw:
        return None
    return blob[2 + len(raw):]
