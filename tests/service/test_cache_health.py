"""A broken cache is loud: Redis TLS, password and connection failures are named at
startup (one ERROR line), in the health answer and in the metrics, while every request
is still served (as a miss). Real Redis servers behind real TLS, certificates made for
the test."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hero.vision.v1 import vision_pb2

from services import healthcheck
from services.common.store import StoreError, open_store
from services.local import RedisProcess, free_port
from services.vision.api import add_public_services
from services.vision.cache import CacheHealth, CountingMetrics, TokenCache
from services.vision.ingress import HEALTH_CACHE_S, VisionIngress, cache_metadata
from tests.service.redis_tls import TlsTerminator, make_pki
from tests.service.vision_harness import Context, InProcessEncoder, png_bytes, vision_config

PASSWORD = "cache-test-password"
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost and 127.0.0.1, and one for `redis` only."""
    return make_pki(tmp_path_factory.mktemp("redis-pki"), good=("localhost", "127.0.0.1"),
                    other_host=("redis",))


@pytest.fixture(scope="module")
def tls_redis(pki):
    """A password-protected Redis reached over TLS with either certificate."""
    server = RedisProcess(maxmemory="64mb", password=PASSWORD).start()
    fronts = {name: TlsTerminator(server.port, pki / f"{name}.crt", pki / f"{name}.key")
              .start() for name in ("good", "other_host")}
    yield server, fronts
    for front in fronts.values():
        front.stop()
    server.stop()


async def store_failure(url: str, password: str | None = None,
                        ca: Path | None = None) -> StoreError | None:
    store = open_store(url, 1.0, 1.0, password=password,
                       tls_ca_file=str(ca) if ca else None)
    try:
        await store.ping()
        return None
    except StoreError as exc:
        return exc
    finally:
        await store.close()


@pytest.mark.parametrize(("case", "reason", "message"), [
    ("other_host", "tls", "Redis TLS certificate does not match host localhost: set the "
     "certificate's subjectAltName to DNS:localhost"),
    ("other_host_ip", "tls", "does not match host 127.0.0.1: set the certificate's "
     "subjectAltName to IP:127.0.0.1"),
    ("unknown_ca", "tls", "is not trusted (unable to get local issuer certificate): set "
     "cache.tls_ca_file"),
    ("wrong_password", "auth", "refused the password (WRONGPASS)"),
    ("no_password", "auth", "requires a password (NOAUTH): set cache.password"),
    ("plain_to_tls", "connection", "use rediss://"),
    ("refused", "connection", "refused the connection"),
])
def test_each_redis_failure_names_its_cause_and_never_the_password(tls_redis, pki, case,
                                                                   reason, message):
    _, fronts = tls_redis
    good, other = fronts["good"].port, fronts["other_host"].port
    ca = pki / "ca.crt"
    url, password, trust = {
        "other_host": (f"rediss://localhost:{other}/0", PASSWORD, ca),
        "other_host_ip": (f"rediss://127.0.0.1:{other}/0", PASSWORD, ca),
        "unknown_ca": (f"rediss://localhost:{good}/0", PASSWORD, None),
        "wrong_password": (f"rediss://:wrong-{PASSWORD}@localhost:{good}/0", None, ca),
        "no_password": (f"rediss://localhost:{good}/0", None, ca),
        "plain_to_tls": (f"redis://127.0.0.1:{good}/0", PASSWORD, None),
        "refused": (f"redis://127.0.0.1:{free_port()}/0", PASSWORD, None),
    }[case]
    error = asyncio.run(store_failure(url, password, trust))
    assert error is not None and error.reason == reason
    assert message in str(error), str(error)
    assert PASSWORD not in str(error) and PASSWORD not in error.summary
    assert "localhost" not in error.summary and "127.0.0.1" not in error.summary
    assert asyncio.run(store_failure(fronts["good"].url("localhost"), PASSWORD, ca)) is None


def test_an_outage_is_one_error_line_every_failure_is_counted_and_recovery_is_seen(
        redis_server, caplog):
    caplog.set_level(logging.WARNING, logger="hero.vision.cache")

    async def scenario():
        metrics = CountingMetrics()
        cache = TokenCache(open_store(redis_server.url), metrics, 60.0, 1 << 20)
        assert (await cache.check()).up and metrics.up is True
        redis_server.stop()
        health = await cache.check()
        assert (health.up, health.reason) == (False, "connection")
        for _ in range(3):
            assert await cache.get("k") is None  # a miss, as before
        assert metrics.errors == {"connection": 4} and metrics.up is False
        assert "refused the connection" in cache.health.detail
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and f"Redis at 127.0.0.1:{redis_server.port}" in errors[0]
        assert "rediss://" not in errors[0]  # it answered before: no protocol mismatch
        redis_server.start()
        assert (await cache.check()).up and metrics.up is True
        assert "answers again" in caplog.records[-1].getMessage()
        await cache.store.close()
    asyncio.run(scenario())


def test_health_metadata_names_a_degraded_cache_without_hosts():
    degraded = CacheHealth(False, "tls", "Redis TLS certificate does not match host redis",
                           "Redis TLS certificate does not match the host name of cache.url")
    assert cache_metadata(degraded) == [
        ("hero-cache", "degraded"), ("hero-cache-reason", "tls"),
        ("hero-cache-detail", "Redis TLS certificate does not match the host name of "
                              "cache.url")]
    assert cache_metadata(CacheHealth(True)) == [("hero-cache", "ok")]
    assert cache_metadata(CacheHealth()) == [("hero-cache", "unknown")]


def run_ingress(scenario, encoder_object, language_port: int, url: str, **cache):
    """`scenario(ingress, metrics)` with an ingress over the cache at `url` and the
    language server on `language_port`; `metrics` counts the cache's store calls from
    the startup check on."""
    async def main():
        config = vision_config(url, cache=cache, language_target=f"127.0.0.1:{language_port}")
        ingress = VisionIngress(InProcessEncoder(encoder_object), config)
        # the startup check is a task that has not run yet: count it too
        ingress.cache.metrics = metrics = CountingMetrics()
        try:
            assert ingress.cache_checked is not None
            await ingress.cache_checked
            return await scenario(ingress, metrics)
        finally:
            await ingress.cache.store.close()
            await ingress.language.close()
    return asyncio.run(main())


async def prune_twice(ingress: VisionIngress, seed: int) -> list[bool]:
    """Whether each of two Prune calls for one new image was a cache hit."""
    hits = []
    for _ in range(2):
        request = vision_pb2.PruneRequest(image=vision_pb2.ImageInput(data=png_bytes(seed)),
                                          question="what is it?")
        answers = [answer async for answer in ingress.Prune(request, Context())]
        hits.append(answers[0].accepted.cache_hit)
    return hits


async def health_over_grpc(ingress: VisionIngress) -> tuple[int, str]:
    """`python -m services.healthcheck` against the ingress served on a loopback port:
    its exit status and what it printed."""
    import contextlib
    import io

    server = grpc.aio.server()
    add_public_services(ingress, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            status = await asyncio.to_thread(healthcheck.main, [f"127.0.0.1:{port}"])
    finally:
        await server.stop(0)
    return status, out.getvalue().strip()


@pytest.mark.parametrize(("case", "reason", "logged", "reported"), [
    ("other_host", "tls",
     "Redis TLS certificate does not match host localhost: set the certificate's "
     "subjectAltName to DNS:localhost",
     "Redis TLS certificate does not match the host name of cache.url"),
    ("wrong_password", "auth", "refused the password (WRONGPASS)",
     "Redis refused the password (WRONGPASS)"),
])
def test_a_broken_cache_is_logged_at_startup_degraded_in_health_counted_and_served_as_misses(
        tls_redis, pki, encoder_object, server, caplog, case, reason, logged, reported):
    _, fronts = tls_redis
    front = fronts["other_host" if case == "other_host" else "good"]
    password = "not-the-password" if case == "wrong_password" else PASSWORD
    caplog.set_level(logging.ERROR, logger="hero.vision.cache")

    async def scenario(ingress, metrics):
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and logged in errors[0], errors  # at startup, before traffic
        assert metrics.up is False and metrics.errors == {reason: 1}
        assert await prune_twice(ingress, seed=len(case)) == [False, False]
        assert metrics.errors[reason] > 1  # each failed call, not only the first
        context = Context()
        answer = await ingress.Check(health_pb2.HealthCheckRequest(), context)
        assert answer.status == SERVING  # misses still serve: not a reason to be unready
        assert context.trailing == {"hero-cache": "degraded", "hero-cache-reason": reason,
                                    "hero-cache-detail": reported}
        assert await health_over_grpc(ingress) == (
            0, f"serving (cache degraded, {reason}: {reported})")

    run_ingress(scenario, encoder_object, server.port, front.url("localhost"),
                password=password, tls_ca_file=str(pki / "ca.crt"))


def test_a_good_tls_configuration_is_healthy_and_serves_hits(tls_redis, pki, encoder_object,
                                                              server, caplog):
    _, fronts = tls_redis
    caplog.set_level(logging.WARNING, logger="hero.vision.cache")

    async def scenario(ingress, metrics):
        assert metrics.up is True and not metrics.errors
        assert await prune_twice(ingress, seed=4242) == [False, True]
        context = Context()
        answer = await ingress.Check(health_pb2.HealthCheckRequest(), context)
        assert answer.status == SERVING and context.trailing == {"hero-cache": "ok"}
        assert await health_over_grpc(ingress) == (0, "serving")
        assert not [r for r in caplog.records if r.name == "hero.vision.cache"]

    run_ingress(scenario, encoder_object, server.port, fronts["good"].url("localhost"),
                password=PASSWORD, tls_ca_file=str(pki / "ca.crt"))


def test_serve_health_checks_follow_redis_without_traffic_and_never_fail(
        redis_server, encoder_object, server):
    async def scenario(ingress, metrics):
        assert metrics.up is True and ingress.cache.health.up
        redis_server.stop()
        await asyncio.sleep(HEALTH_CACHE_S)  # no call since: the next check asks Redis
        assert await ingress.check_health() is None  # a cache outage never fails a replica
        assert metrics.up is False and ingress.cache.health.reason == "connection"
        redis_server.start()
        await asyncio.sleep(HEALTH_CACHE_S)
        await ingress.check_health()
        assert metrics.up is True and ingress.cache.health.up

    run_ingress(scenario, encoder_object, server.port, redis_server.url)
