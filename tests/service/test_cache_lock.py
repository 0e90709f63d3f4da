"""The cross-replica encode lock of the token cache, over a real Redis server process:
one encoding per image across replicas, renewed by its owner, released only by it, and
a dead owner stalls others at most its lifetime."""

from __future__ import annotations

import asyncio

import pytest

from services.common.store import open_store
from services.vision.cache import CountingMetrics, TokenCache
from tests.service.conftest import cache_for


def test_two_replicas_missing_at_once_encode_once(redis_server):
    """Two caches (as in two ingress replicas) share one Redis: the second waits."""
    async def scenario():
        (first, m1), (second, m2) = cache_for(redis_server.url), cache_for(redis_server.url)
        calls = 0

        async def produce() -> bytes:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.3)
            return b"tokens"

        a, b = await asyncio.gather(first.get_or_create("img", produce, bytes),
                                    second.get_or_create("img", produce, bytes))
        assert calls == 1 and a[0] == b[0] == b"tokens"
        assert m1.counts.get("coalesced", 0) + m2.counts.get("coalesced", 0) == 1
        assert not await first.store.exists("img:lock")
        await first.store.close()
        await second.store.close()
    asyncio.run(scenario())


def test_a_replica_that_fails_releases_its_lock_so_others_produce(redis_server):
    async def scenario():
        (first, _), (second, _) = cache_for(redis_server.url), cache_for(redis_server.url)

        async def broken() -> bytes:
            await asyncio.sleep(0.2)
            raise RuntimeError("encoder died")

        async def good() -> bytes:
            return b"tokens"

        failing = asyncio.create_task(first.get_or_create("img", broken, bytes))
        while not await first.store.exists("img:lock"):  # the first replica holds the lock
            await asyncio.sleep(0.005)
        waiting = asyncio.create_task(second.get_or_create("img", good, bytes))
        with pytest.raises(RuntimeError, match="encoder died"):
            await failing
        assert await waiting == (b"tokens", False)
        await first.store.close()
        await second.store.close()
    asyncio.run(scenario())


def test_the_lock_is_renewed_while_its_owner_produces(redis_server):
    """A production longer than the lock's lifetime keeps the lock: no second encoding."""
    async def scenario():
        first = TokenCache(open_store(redis_server.url), CountingMetrics(), 60.0, 1 << 20,
                           lock_ttl_s=0.6)
        second = TokenCache(open_store(redis_server.url), CountingMetrics(), 60.0, 1 << 20,
                            lock_ttl_s=0.6)
        calls = 0

        async def slow() -> bytes:
            nonlocal calls
            calls += 1
            await asyncio.sleep(2.0)
            return b"tokens"

        a, b = await asyncio.gather(first.get_or_create("img", slow, bytes),
                                    second.get_or_create("img", slow, bytes))
        assert calls == 1 and a[0] == b[0] == b"tokens"
        await first.store.close()
        await second.store.close()
    asyncio.run(scenario())


def test_a_lock_is_released_only_by_its_owner(redis_server):
    """The first replica's lock expires (say Redis lost it); the second takes the lock. When
    the first finishes it must not release the second's lock, or a third would encode too."""
    import redis

    raw = redis.Redis(port=redis_server.port)

    async def scenario():
        caches = [cache_for(redis_server.url)[0] for _ in range(3)]
        calls = 0

        async def produce() -> bytes:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.6)
            return b"tokens"

        async def broken() -> bytes:
            await asyncio.sleep(0.3)
            raise RuntimeError("first replica failed")

        first = asyncio.create_task(caches[0].get_or_create("img", broken, bytes))
        while not raw.exists("img:lock"):
            await asyncio.sleep(0.005)
        raw.delete("img:lock")  # the first replica's lock is gone; it does not know
        second = asyncio.create_task(caches[1].get_or_create("img", produce, bytes))
        with pytest.raises(RuntimeError):
            await first  # fails while the second replica is producing
        assert raw.exists("img:lock"), "the first replica released the second's lock"
        third = await caches[2].get_or_create("img", produce, bytes)
        assert third == (b"tokens", False) and (await second)[0] == b"tokens" and calls == 1
        for cache in caches:
            await cache.store.close()
    asyncio.run(scenario())


def test_waiters_give_up_at_their_own_deadline(redis_server):
    import time

    from services.common.errors import DeadlineError

    async def scenario():
        (first, _), (second, _) = cache_for(redis_server.url), cache_for(redis_server.url)

        async def slow() -> bytes:
            await asyncio.sleep(2.0)
            return b"tokens"

        producing = asyncio.create_task(first.get_or_create("img", slow, bytes))
        await asyncio.sleep(0.1)
        for cache in (first, second):  # the same replica, and another one
            start = time.monotonic()
            with pytest.raises(DeadlineError, match="deadline"):
                await cache.get_or_create("img", slow, bytes, deadline=start + 0.4)
            assert time.monotonic() - start < 0.8
        assert await producing == (b"tokens", False)
        await first.store.close()
        await second.store.close()
    asyncio.run(scenario())


KILLED_REPLICA = """
import asyncio, sys
from services.common.store import open_store
from services.vision.cache import CountingMetrics, TokenCache
from services.vision.config import VisionConfig

async def main():
    cache = TokenCache(open_store(sys.argv[1]), CountingMetrics(), 60.0, 1 << 20,
                       lock_ttl_s=VisionConfig().cache.lock_ttl_s)
    async def forever() -> bytes:
        print("encoding", flush=True)
        await asyncio.sleep(3600)
        return b""
    await cache.get_or_create("img", forever, bytes)

asyncio.run(main())
"""


def test_a_replica_killed_mid_encode_stalls_the_image_at_most_the_lock_ttl(redis_server):
    """With the shipped settings, a replica that dies holding the lock (SIGKILL: no
    cleanup) delays the others by at most the lock's lifetime, well inside a deadline."""
    import subprocess
    import sys
    import time

    from services.vision.config import VisionConfig

    ttl = VisionConfig().cache.lock_ttl_s
    assert ttl <= 15, "a dead replica's lock must not outlast a typical client deadline"
    replica = subprocess.Popen([sys.executable, "-c", KILLED_REPLICA, redis_server.url],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert replica.stdout.readline().strip() == "encoding"
        replica.kill()
        replica.wait()
        killed_at = time.monotonic()

        async def scenario():
            cache, _ = cache_for(redis_server.url)

            async def produce() -> bytes:
                return b"tokens"

            value = await cache.get_or_create("img", produce, bytes,
                                              deadline=killed_at + ttl + 5)
            await cache.store.close()
            return value

        assert asyncio.run(scenario()) == (b"tokens", False)
        assert time.monotonic() - killed_at <= ttl + 2
    finally:
        replica.kill()


def test_a_cancelled_or_late_leader_does_not_fail_the_requests_waiting_with_it(redis_server):
    """The first request for an image starts its encoding; when that request is cancelled
    (its client went away) or reaches its deadline, the encoding still completes for the
    requests that joined it, and lands in the cache."""
    import time

    from services.common.errors import DeadlineError

    async def scenario():
        cache, metrics = cache_for(redis_server.url)
        calls = 0

        async def slow() -> bytes:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.6)
            return b"tokens"

        leader = asyncio.create_task(cache.get_or_create("img", slow, bytes))
        await asyncio.sleep(0.1)
        follower = asyncio.create_task(cache.get_or_create("img", slow, bytes))
        await asyncio.sleep(0.1)
        leader.cancel()
        assert await follower == (b"tokens", False) and calls == 1
        with pytest.raises(DeadlineError):  # a leader past its deadline stops waiting...
            await cache.get_or_create("other", slow, bytes, deadline=time.monotonic() + 0.2)
        await asyncio.sleep(0.6)  # ...while its encoding completes and is stored
        assert await cache.get_or_create("other", slow, bytes) == (b"tokens", True)
        assert calls == 2 and metrics.counts["miss"] == 2
        await cache.store.close()
    asyncio.run(scenario())
