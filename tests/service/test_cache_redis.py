"""The token cache over a real Redis server process on a free loopback port."""


from __future__ import annotations

import asyncio

import pytest

from services.common.store import MemoryStore, RedisStore, open_store
from services.local import RedisProcess
from services.vision.cache import CountingMetrics, TokenCache
from tests.service.conftest import cache_for


def test_values_round_trip_and_expire(redis_server):
    async def scenario():
        # what is tested is expiry, not the store's timeout: room for a loaded machine
        cache, _ = cache_for(redis_server.url, timeout_s=2.0, ttl_s=0.3)
        assert await cache.put("k", b"value")
        assert await cache.get("k") == b"value"
        await asyncio.sleep(0.5)
        assert await cache.get("k") is None
        await cache.store.close()
    asyncio.run(scenario())


def test_too_large_values_are_not_stored(redis_server):
    async def scenario():
        cache, metrics = cache_for(redis_server.url, max_entry_bytes=10)
        assert not await cache.put("k", b"x" * 11)
        assert await cache.get("k") is None and metrics.counts["too_large"] == 1
        await cache.store.close()
    asyncio.run(scenario())


def test_single_flight_runs_the_producer_once(redis_server):
    async def scenario():
        cache, metrics = cache_for(redis_server.url)
        calls = 0

        async def produce() -> bytes:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.2)
            return b"tokens"

        results = await asyncio.gather(*[cache.get_or_create("img", produce, bytes)
                                         for _ in range(8)])
        assert calls == 1
        assert all(value == b"tokens" for value, _ in results)
        assert metrics.counts["miss"] == 1 and metrics.counts["coalesced"] == 7
        assert await cache.get_or_create("img", produce, bytes) == (b"tokens", True)
        assert calls == 1
        await cache.store.close()
    asyncio.run(scenario())


def test_a_failing_producer_fails_every_waiter_and_is_retried_next_time(redis_server):
    async def scenario():
        cache, _ = cache_for(redis_server.url)

        async def broken() -> bytes:
            await asyncio.sleep(0.05)
            raise ValueError("bad image")

        results = await asyncio.gather(*[cache.get_or_create("k", broken, bytes)
                                         for _ in range(3)], return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)

        async def good() -> bytes:
            return b"ok"
        assert await cache.get_or_create("k", good, bytes) == (b"ok", False)
        await cache.store.close()
    asyncio.run(scenario())


def test_a_corrupt_entry_is_a_miss_that_gets_overwritten(redis_server):
    from hero_core.errors import CorruptPayloadError

    def decode(value: bytes) -> bytes:
        if not value.startswith(b"v2:"):
            raise CorruptPayloadError("old format")
        return value

    async def scenario():
        cache, metrics = cache_for(redis_server.url)
        await cache.put("k", b"v1:stale")

        async def produce() -> bytes:
            return b"v2:fresh"

        assert await cache.get_or_create("k", produce, decode) == (b"v2:fresh", False)
        assert metrics.counts["corrupt"] == 1
        assert await cache.get_or_create("k", produce, decode) == (b"v2:fresh", True)
        await cache.store.close()
    asyncio.run(scenario())


def test_redis_down_is_a_miss_and_counted_then_recovers(redis_server):
    async def scenario():
        cache, metrics = cache_for(redis_server.url)

        async def produce() -> bytes:
            return b"tokens"

        redis_server.stop()
        value, hit = await cache.get_or_create("k", produce, bytes)
        assert (value, hit) == (b"tokens", False)
        assert metrics.counts["error_get"] >= 1 and metrics.counts["error_set"] >= 1
        redis_server.start()
        assert await cache.get_or_create("k", produce, bytes) == (b"tokens", False)
        assert await cache.get_or_create("k", produce, bytes) == (b"tokens", True)
        await cache.store.close()
    asyncio.run(scenario())


def test_url_schemes_pick_the_backend():
    assert isinstance(open_store("memory://"), MemoryStore)
    tls = open_store("rediss://:secret@127.0.0.1:6380/0")
    assert isinstance(tls, RedisStore)
    assert tls.client.connection_pool.connection_class.__name__ == "SSLConnection"
    with pytest.raises(ValueError, match="redis://, rediss://"):
        open_store("http://x")


def test_memory_store_evicts_least_recently_used():
    async def scenario():
        store = MemoryStore(max_bytes=10)
        await store.set("a", b"12345", None)
        await store.set("b", b"12345", None)
        await store.get("a")
        await store.set("c", b"12345", None)
        assert await store.get("b") is None and await store.get("a") == b"12345"
    asyncio.run(scenario())


def test_redis_auth_is_used_and_a_wrong_password_is_only_a_miss():
    server = RedisProcess(password="s3cret-for-test").start()
    try:
        async def scenario():
            good = TokenCache(open_store(server.url, password="s3cret-for-test"),
                              CountingMetrics(), 60.0, 1 << 20)
            assert await good.put("k", b"v") and await good.get("k") == b"v"
            metrics = CountingMetrics()
            bad = TokenCache(open_store(server.url, password="wrong"), metrics, 60.0, 1 << 20)
            assert await bad.get("k") is None and metrics.counts["error_get"] == 1
            await good.store.close()
            await bad.store.close()
        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_slow_redis_is_a_miss_within_the_timeout_and_recovers(redis_server):
    import time

    import redis

    async def scenario():
        metrics = CountingMetrics()
        cache = TokenCache(open_store(redis_server.url, timeout_s=0.2), metrics, 60.0, 1 << 20)

        async def produce() -> bytes:
            return b"tokens"

        assert await cache.put("k", b"tokens")
        redis.Redis(port=redis_server.port).execute_command("CLIENT", "PAUSE", 1500)
        start = time.monotonic()
        assert await cache.get_or_create("k", produce, bytes) == (b"tokens", False)
        assert time.monotonic() - start < 1.0, "a stalled Redis must not stall requests"
        assert metrics.counts["error_get"] >= 1
        await asyncio.sleep(1.6)
        assert await cache.get_or_create("k", produce, bytes) == (b"tokens", True)
        await cache.store.close()
    asyncio.run(scenario())


def test_a_value_found_under_the_wrong_key_is_never_served(redis_server):
    import redis

    async def scenario():
        cache, metrics = cache_for(redis_server.url)
        assert await cache.put("image-a", b"tokens of a")
        raw = redis.Redis(port=redis_server.port)
        raw.set("image-b", raw.get("image-a"))  # e.g. a misrouted or desynchronised reply

        async def produce() -> bytes:
            return b"tokens of b"

        assert await cache.get_or_create("image-b", produce, bytes) == (b"tokens of b", False)
        assert metrics.counts["corrupt"] == 1
        assert await cache.get("image-b") == b"tokens of b"
        await cache.store.close()
    asyncio.run(scenario())
