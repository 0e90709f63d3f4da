"""A lock on one key across the replicas that share a store, for work that should run
once however many replicas want its result (encoding an image).

Over Redis it is redis-py's `Lock`: the key holds a random token, only the holder's
token releases or extends it (checked atomically in Redis), and it expires `ttl_s`
after it was taken or last extended, so a holder that dies stalls the others at most
that long. Its failures are the store's (`StoreError`, counted and diagnosed like any
other call). A `memory://` store belongs to one replica: there is nobody to coordinate
with, so its lock is always granted.
"""

from __future__ import annotations

from typing import Any, Protocol

from services.common.store import RedisStore, Store


class ReplicaLock(Protocol):
    name: str
    taken: bool
    """Whether `acquire` took the lock (one never taken has nothing to extend or let go)."""

    async def acquire(self) -> bool:
        """Take the lock if nobody holds it; whether it was taken."""

    async def extend(self) -> bool:
        """Give the held lock its full lifetime again; False when it is no longer ours
        (it expired and another took it)."""

    async def release(self) -> bool:
        """Let go of the lock if it is still ours; whether it was."""

    async def held(self) -> bool:
        """Whether anyone holds the lock now."""


class RedisLock:
    """redis-py's token-checked `Lock`, each call bounded by the store's timeout."""

    def __init__(self, store: RedisStore, name: str, ttl_s: float):
        self.store, self.name, self.ttl_s = store, name, ttl_s
        self.lock: Any = store.client.lock(name, timeout=ttl_s, blocking=False,
                                           thread_local=False)
        self.taken = False

    async def acquire(self) -> bool:
        self.taken = bool(await self.store.call(self.lock.acquire(blocking=False)))
        return self.taken

    async def extend(self) -> bool:
        return self.taken and await self.store.call(
            self._owned(self.lock.extend(self.ttl_s, replace_ttl=True)))

    async def release(self) -> bool:
        return self.taken and await self.store.call(self._owned(self.lock.release()))

    async def held(self) -> bool:
        return await self.store.exists(self.name)

    @staticmethod
    async def _owned(op: Any) -> bool:
        """Whether `op` (an extend or release) found the lock still ours."""
        from redis.exceptions import LockNotOwnedError

        try:
            await op
        except LockNotOwnedError:
            return False
        return True


class LocalLock:
    """The lock of a store only one replica uses: always granted."""

    def __init__(self, name: str):
        self.name, self.taken = name, False

    async def acquire(self) -> bool:
        self.taken = True
        return True

    async def extend(self) -> bool:
        return True

    async def release(self) -> bool:
        return True

    async def held(self) -> bool:
        return False


def replica_lock(store: Store, name: str, ttl_s: float) -> ReplicaLock:
    """The lock named `name` (a key of its own) among the replicas that share `store`."""
    if isinstance(store, RedisStore):
        return RedisLock(store, name, ttl_s)
    return LocalLock(name)
