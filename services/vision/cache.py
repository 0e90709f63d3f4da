"""The token cache: a store plus the policy around it.

* A store failure or timeout is a miss: logged, counted, never a failed request
  (`get(strict=True)` lets a caller that cannot do without the value tell "down" from
  "absent"). Every store call keeps `health` current: when the store stops answering
  (or answers nothing at startup, `check`), one ERROR line says why (a TLS certificate
  without the host name of the URL, a refused password, ...) and the up gauge drops to 0;
  every failure is counted by its kind.
* Every value is stored in an envelope naming its own key, and, when a secret is
  configured, an HMAC-SHA256 over key and value. It is checked once, when the value is
  read: a value that comes back under another key (a copy, a misrouted reply) or
  without a valid MAC (written by anyone without the secret) is dropped and counted,
  never served. What the key names (image, encoder, method) is therefore not recorded
  in, nor checked against, the value again.
* Values above `max_entry_bytes` are not stored.
* A value is produced once however many callers miss it at the same time: within a
  replica they share one production (`SingleFlight`); across replicas the producer
  holds a lock (`services.common.locks`) that it extends while it works, so a replica
  that dies mid-production stalls the others for at most `lock_ttl_s`, and the others
  wait for it and read what it stored. Waiters give up at their own deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from services.common.errors import DeadlineError
from services.common.locks import ReplicaLock, replica_lock
from services.common.store import Store, StoreError

T = TypeVar("T")
R = TypeVar("R")
LOCK_SUFFIX = ":lock"
MAGIC = b"HRC2"
MAC_BYTES = 32

log = logging.getLogger("hero.vision.cache")


class CacheMetrics(Protocol):
    def observe(self, event: str) -> None:
        """Count one event: hit, miss, coalesced, corrupt, unverified, error_get,
        error_set, too_large, lock_lost."""

    def store_error(self, reason: str) -> None:
        """Count one failed store call by its kind (`services.common.store.REASONS`)."""

    def store_up(self, up: bool) -> None:
        """The store answers (True) or its last call failed (False)."""


class CountingMetrics:
    """Plain counters, for use outside a metrics system (CLI, tests of the policy)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.up: bool | None = None

    def observe(self, event: str) -> None:
        self.counts[event] = self.counts.get(event, 0) + 1

    def store_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def store_up(self, up: bool) -> None:
        self.up = up


@dataclasses.dataclass(frozen=True)
class CacheHealth:
    """The store as its last call found it."""

    up: bool | None = None
    """None until the store is first called."""
    reason: str = ""
    """While down: the kind of failure, one of `services.common.store.REASONS`."""
    detail: str = ""
    """While down: what failed and what to change (names hosts: for logs)."""
    summary: str = ""
    """While down: what failed, naming no host or port (for health answers)."""


class TokenCache:
    """get / put / get_or_create over a `Store`, degrading to misses on failure."""

    def __init__(self, store: Store, metrics: CacheMetrics, ttl_s: float | None,
                 max_entry_bytes: int, lock_ttl_s: float = 10.0, poll_s: float = 0.025,
                 secret: bytes | None = None):
        self.store, self.metrics = store, metrics
        self.ttl_s, self.max_entry_bytes = ttl_s, max_entry_bytes
        self.lock_ttl_s, self.poll_s = lock_ttl_s, poll_s
        self.secret = secret or None
        self.flights = SingleFlight()
        self.health = CacheHealth()
        self.checked_at = 0.0
        """`time.monotonic()` of the last store call, successful or not."""

    async def check(self, max_age_s: float = 0.0) -> CacheHealth:
        """`health`, after asking the store whether it answers (a PING) unless a store
        call answered or failed less than `max_age_s` ago; never raises `StoreError`."""
        if self.health.up is None or time.monotonic() - self.checked_at >= max_age_s:
            with contextlib.suppress(StoreError):
                await self._call(self.store.ping())
        return self.health

    async def _call(self, op: Awaitable[R]) -> R:
        """Await one store operation, keeping `health` and the store metrics current."""
        try:
            result = await op
        except StoreError as exc:
            self._failed(exc)
            raise
        self.checked_at = time.monotonic()
        if self.health.up is not True:
            if self.health.up is False:
                log.warning("token cache answers again: requests are served from it")
            self.health = CacheHealth(up=True)
            self.metrics.store_up(True)
        return result

    def _failed(self, exc: StoreError) -> None:
        """Count a failed call and keep its cause; log at ERROR when the store goes down,
        or fails in another way (a new `reason`) while down."""
        self.checked_at = time.monotonic()
        self.metrics.store_error(exc.reason)
        known = self.health.up is False and self.health.reason == exc.reason
        self.health = CacheHealth(False, exc.reason, str(exc), exc.summary)
        if known:
            return
        self.metrics.store_up(False)
        log.error("token cache unavailable (%s), every request is served as a miss until "
                  "it answers: %s", exc.reason, exc)

    async def get(self, key: str, strict: bool = False) -> bytes | None:
        """The value under `key`, None when absent or unusable. A store failure is None
        too, unless `strict`: then it raises `StoreError`."""
        try:
            blob = await self._call(self.store.get(key))
        except StoreError as exc:
            self.metrics.observe("error_get")
            if strict:
                raise
            log.warning("cache get failed, serving as a miss: %s", exc)
            return None
        if blob is None:
            return None
        value, problem = unseal(key, blob, self.secret)
        if value is None:
            self.metrics.observe("unverified" if problem == "mac" else "corrupt")
            log.warning("cache value under %s dropped: %s", key, problem)
            await self.invalidate(key)
        return value

    async def put(self, key: str, value: bytes) -> bool:
        if len(value) > self.max_entry_bytes:
            self.metrics.observe("too_large")
            return False
        try:
            await self._call(self.store.set(key, seal(key, value, self.secret), self.ttl_s))
            return True
        except StoreError as exc:
            self.metrics.observe("error_set")
            log.warning("cache set failed, value not stored: %s", exc)
            return False

    async def invalidate(self, key: str) -> None:
        """Drop a value found unusable (corrupt or from another version)."""
        try:
            await self._call(self.store.delete(key))
        except StoreError as exc:
            log.warning("cache delete failed: %s", exc)

    async def get_or_create(self, key: str, create: Callable[[], Awaitable[bytes]],
                            decode: Callable[[bytes], T], *,
                            deadline: float | None = None) -> tuple[T, bool]:
        """The decoded value under `key`, and whether it came from the store; on a miss,
        `create`'s value, produced once (`once`) and stored."""
        found = await self.find(key, decode)
        if found is not None:
            return found, True

        async def made() -> tuple[T, bytes]:
            data = await create()
            return decode(data), data

        return await self.once(key, made, decode, deadline=deadline), False

    async def find(self, key: str, decode: Callable[[bytes], T]) -> T | None:
        """The decoded value under `key` (a hit), or None: absent, or unusable, in which
        case it is dropped (`discard`). `decode` failing in any way on a stored value
        counts as unusable: the value came from the store."""
        found = await self._usable(key, decode)
        if found is None:
            return None
        self.metrics.observe("hit")
        return found[0]

    async def once(self, key: str, create: Callable[[], Awaitable[tuple[T, bytes]]],
                   decode: Callable[[bytes], T], *, deadline: float | None = None) -> T:
        """The value of a miss: `create`'s (value, bytes to store), produced once for every
        caller of this replica that asks meanwhile and, through the lock, once across
        replicas (another replica's value is read back with `decode`). A caller that is
        cancelled or whose `deadline` (`time.monotonic()`) passes stops waiting
        (`DeadlineError`); the production goes on for the others and the cache. Its
        failure reaches every caller."""
        running, joined = self.flights.start(key, lambda: self._produce(key, create, decode))
        self.metrics.observe("coalesced" if joined else "miss")
        return await wait(running, deadline)

    async def _usable(self, key: str, decode: Callable[[bytes], T]) -> tuple[T] | None:
        """The decoded stored value, or None (absent, or dropped as unusable)."""
        value = await self.get(key)
        if value is None:
            return None
        try:
            return (decode(value),)
        except Exception as exc:  # whatever a stored value makes `decode` raise
            await self.discard(key, f"{type(exc).__name__}: {exc}")
            return None

    async def discard(self, key: str, problem: str) -> None:
        """Count, log and delete a stored value found unusable (`problem` says why), so
        the next request rebuilds it."""
        self.metrics.observe("corrupt")
        log.warning("dropping unusable cache entry %s: %.300s", key, problem)
        await self.invalidate(key)

    async def _produce(self, key: str, create: Callable[[], Awaitable[tuple[T, bytes]]],
                       decode: Callable[[bytes], T]) -> T:
        """Take the cross-replica lock and produce, or wait for its holder's value; when
        the holder lets go (or dies, and its lock expires) without a value, try again."""
        while True:
            lock = replica_lock(self.store, key + LOCK_SUFFIX, self.lock_ttl_s)
            if await self._acquire(lock):
                async with self._holding(lock):
                    value, data = await create()
                    await self.put(key, data)
                return value
            if await self._wait_for_other_replica(lock, key):
                found = await self._usable(key, decode)
                if found is not None:
                    self.metrics.observe("coalesced")
                    return found[0]

    async def _acquire(self, lock: ReplicaLock) -> bool:
        """Take `lock`; True also when the store is down (then there is nobody to
        coordinate with and this replica just produces)."""
        try:
            return await self._call(lock.acquire())
        except StoreError:
            return True

    @contextlib.asynccontextmanager
    async def _holding(self, lock: ReplicaLock) -> AsyncIterator[None]:
        """Extend the lock every third of its lifetime while the body runs; release it
        after, if it is still ours. (With the store down it was never taken: nothing
        to do.)"""
        async def renew() -> None:
            while True:
                await asyncio.sleep(self.lock_ttl_s / 3)
                try:
                    if not await self._call(lock.extend()):
                        self.metrics.observe("lock_lost")
                        log.warning("lost the lock %s while producing", lock.name)
                        return
                except StoreError:
                    pass  # the next renewal tries again; the lock outlives one failure

        renewal = asyncio.create_task(renew()) if lock.taken else None
        try:
            yield
        finally:
            if renewal is not None:
                renewal.cancel()
                try:
                    await self._call(lock.release())
                except StoreError as exc:
                    log.warning("could not release the lock %s (it expires): %s", lock.name,
                                exc)

    async def _wait_for_other_replica(self, lock: ReplicaLock, key: str) -> bool:
        """Poll while another replica holds `lock` (at most its lifetime after that replica
        stops extending it). True when its value may be there (the lock is gone, or the
        value appeared); False when the store fails (this replica then produces)."""
        try:
            while await self._call(lock.held()):
                await asyncio.sleep(self.poll_s)
                if await self._call(self.store.exists(key)):
                    return True
            return True
        except StoreError:
            return False


class SingleFlight:
    """One run at a time of the work for a key, shared by every caller that asks while it
    runs. The work runs in a task of its own: a caller that stops waiting (cancelled,
    or past its deadline) never stops it for the others."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[Any]] = {}

    def start(self, key: str, work: Callable[[], Awaitable[T]]) -> tuple[asyncio.Future[T], bool]:
        """The run of `work()` for `key` (`wait` for it), and whether it was already under
        way (then `work` is not called)."""
        running = self._running.get(key)
        if running is not None:
            return running, True
        started = asyncio.ensure_future(work())
        self._running[key] = started
        started.add_done_callback(lambda done: self._settled(key, done))
        return started, False

    def _settled(self, key: str, task: asyncio.Future[Any]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter re-raises it itself


async def wait(pending: asyncio.Future[T], deadline: float | None) -> T:
    """The outcome of a shared run, or `DeadlineError` at `deadline` (`time.monotonic()`);
    the run itself goes on."""
    if deadline is None:
        return await asyncio.shield(pending)
    try:
        return await asyncio.wait_for(asyncio.shield(pending),
                                      max(deadline - time.monotonic(), 0.0))
    except TimeoutError:
        raise DeadlineError("the deadline passed while this image was being encoded; retry "
                            "with a longer deadline") from None


def _mac(secret: bytes, key: bytes, value: bytes) -> bytes:
    return hmac.new(secret, len(key).to_bytes(2, "little") + key + value,
                    hashlib.sha256).digest()


def seal(key: str, value: bytes, secret: bytes | None = None) -> bytes:
    """`value` in its envelope: magic, flags (1 = MAC), u16 key length, key, MAC, value."""
    raw = key.encode()
    mac = _mac(secret, raw, value) if secret else b""
    return MAGIC + bytes([1 if secret else 0]) + len(raw).to_bytes(2, "little") + raw + mac \
        + value


def unseal(key: str, blob: bytes, secret: bytes | None = None) -> tuple[bytes | None, str]:
    """(value, "") for an envelope stored under `key` (with a valid MAC when `secret` is
    given), else (None, what is wrong)."""
    raw = key.encode()
    head = len(MAGIC) + 3
    if blob[:len(MAGIC)] != MAGIC or len(blob) < head:
        return None, "not an envelope of this version"
    flags, length = blob[len(MAGIC)], int.from_bytes(blob[len(MAGIC) + 1:head], "little")
    if length != len(raw) or blob[head:head + length] != raw:
        return None, "stored under another key"
    body = blob[head + length:]
    if not flags & 1:
        return (None, "mac") if secret else (body, "")
    mac, value = body[:MAC_BYTES], body[MAC_BYTES:]
    if secret and not hmac.compare_digest(mac, _mac(secret, raw, value)):
        return None, "mac"
    return value, ""
