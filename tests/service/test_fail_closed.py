"""Both services fail closed: without API tokens they refuse to start, naming the
variables to set, unless `allow_unauthenticated` turns authentication off explicitly;
tokens, when given, are required whether or not it is set. Likewise the vision service
refuses a Redis cache without the key of its entries' HMAC unless `cache.allow_unsigned`
says so, and `hero serve` makes a key per run."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import grpc
import pytest
from hero.language.v1 import language_pb2

from services.common.auth import MissingTokensError
from tests.conftest import ROOT
from tests.service.conftest import free_port, language_config, language_server
from tests.service.vision_harness import vision_config

LANGUAGE_VARS = ("HERO_LANGUAGE_API_TOKENS", "HERO_LANGUAGE_ALLOW_UNAUTHENTICATED")
VISION_VARS = ("HERO_VISION_API_TOKENS", "HERO_VISION_ALLOW_UNAUTHENTICATED")


@pytest.fixture(autouse=True)
def no_tokens_in_the_environment(monkeypatch):
    for name in LANGUAGE_VARS + VISION_VARS:
        monkeypatch.delenv(name, raising=False)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_the_language_service_process_refuses_to_start_without_tokens(tiny_dir):
    """`python -m services.language` (the container's command) exits with the variables
    to set, before binding its port or loading a model."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in LANGUAGE_VARS}
    env.update({"HERO_LANGUAGE_PORT": str(port), "HERO_LANGUAGE_METRICS_PORT": "0",
                "HERO_LANGUAGE_MODELS_DIR": str(tiny_dir.parent)})
    result = subprocess.run([sys.executable, "-m", "services.language"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "MissingTokensError" in result.stderr
    for name in LANGUAGE_VARS:
        assert name in result.stderr, result.stderr[-2000:]
    assert not listening(port)


def test_the_language_server_starts_only_when_allowed_and_then_says_so(language_model,
                                                                       caplog):
    def never_loaded():
        raise AssertionError("the engine was loaded although the server may not start")

    with pytest.raises(MissingTokensError, match="HERO_LANGUAGE_ALLOW_UNAUTHENTICATED"):
        asyncio.run(_start(language_config(allow_unauthenticated=False), never_loaded))

    caplog.set_level("WARNING", logger="hero.auth")
    server = language_server(language_model)  # the harness sets allow_unauthenticated
    try:
        assert "authentication is off" in caplog.text
        assert "HERO_LANGUAGE_ALLOW_UNAUTHENTICATED" in caplog.text
        assert _model_info(server.port, token=None) == grpc.StatusCode.OK
    finally:
        server.stop()


async def _start(config, load_engine):
    from services.language.server import start_server

    return await start_server(config, load_engine)


def _model_info(port: int, token: str | None) -> grpc.StatusCode:
    from hero.language.v1 import language_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = language_pb2_grpc.LanguageServiceStub(channel)
        try:
            stub.GetModelInfo(language_pb2.GetModelInfoRequest(), metadata=metadata,
                              timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_tokens_are_required_even_where_unauthenticated_starts_are_allowed(language_model):
    server = language_server(language_model, api_tokens="secret-token",
                             allow_unauthenticated=True)
    try:
        assert _model_info(server.port, None) == grpc.StatusCode.UNAUTHENTICATED
        assert _model_info(server.port, "secret-token") == grpc.StatusCode.OK
    finally:
        server.stop()


def ray_must_not_start(*args, **kwargs):
    """`ray.init` where a refused app must not get that far (Ray may already run in this
    process: the integration suite's system, in a one-process run)."""
    raise AssertionError("Ray was started for an app the config refuses")


def test_the_vision_app_is_refused_before_ray_starts_without_tokens(monkeypatch):
    """The deploy (`build_app`, what KubeRay and `serve deploy` run) and the single-node
    runner refuse it, naming the variables; Ray is never started."""
    import ray

    from services.local import serve_config
    from services.vision.app import build_app
    from services.vision.runner import ServeApp

    args = vision_config("memory://", allow_unauthenticated=False)
    with pytest.raises(MissingTokensError) as refused:
        build_app(args)
    assert all(name in str(refused.value) for name in VISION_VARS)
    monkeypatch.setattr(ray, "init", ray_must_not_start)
    with pytest.raises(MissingTokensError):
        ServeApp(serve_config(args, free_port(), free_port())).start()
    build_app({**args, "allow_unauthenticated": True})
    monkeypatch.setenv("HERO_VISION_API_TOKENS", "a-token")
    build_app(args)


def test_each_vision_replica_checks_its_own_environment(tiny_dir, monkeypatch):
    """A replica whose environment lacks the tokens the deploy saw does not serve open."""
    from services.vision.ingress import VisionIngress

    async def authenticates(args) -> bool:
        ingress = VisionIngress(object(), args)  # type: ignore[arg-type]
        await ingress.cache.store.close()
        await ingress.language.close()
        return ingress.auth.enabled

    args = vision_config("memory://", allow_unauthenticated=False)
    with pytest.raises(MissingTokensError, match="HERO_VISION_API_TOKENS"):
        asyncio.run(authenticates(args))
    monkeypatch.setenv("HERO_VISION_API_TOKENS", "a-token,another")
    assert asyncio.run(authenticates(args))
    monkeypatch.delenv("HERO_VISION_API_TOKENS")
    assert not asyncio.run(authenticates({**args, "allow_unauthenticated": True}))


def test_the_local_system_turns_authentication_off_only_when_asked(tiny_dir, monkeypatch):
    """`hero serve` asks (`allow_unauthenticated=True`) for both services; tokens in the
    environment still apply to the public API."""
    from services.local import LocalSystem

    redis = "redis://127.0.0.1:6379/0"
    closed = LocalSystem(models_dir=tiny_dir.parent, redis_url=redis)
    assert "HERO_LANGUAGE_ALLOW_UNAUTHENTICATED" not in closed.language.env
    assert "allow_unauthenticated" not in closed.args
    local = LocalSystem(models_dir=tiny_dir.parent, redis_url=redis, allow_unauthenticated=True)
    assert local.language.env["HERO_LANGUAGE_ALLOW_UNAUTHENTICATED"] == "true"
    assert local.args["allow_unauthenticated"] is True and not local.requires_token()
    monkeypatch.setenv("HERO_VISION_API_TOKENS", "a-token")
    assert local.requires_token()


def test_a_redis_cache_without_a_secret_is_refused_before_ray_starts(monkeypatch):
    """Entries without a MAC could be forged by anyone who can write to Redis: the deploy
    and the single-node runner refuse such a cache, naming the variable to set; an empty
    secret is none; `cache.allow_unsigned` and `memory://` are accepted."""
    import ray

    from hero_core.errors import ConfigError
    from services.local import serve_config
    from services.vision.app import build_app
    from services.vision.config import VisionConfig
    from services.vision.runner import ServeApp

    monkeypatch.delenv("HERO_VISION_CACHE__SECRET", raising=False)
    for url in ("redis://127.0.0.1:6379/0", "rediss://cache:6380/0"):
        args = vision_config(url, cache={"allow_unsigned": False})
        with pytest.raises(ConfigError, match="HERO_VISION_CACHE__SECRET") as refused:
            build_app(args)
        assert "cache.allow_unsigned" in str(refused.value)
        monkeypatch.setattr(ray, "init", ray_must_not_start)
        with pytest.raises(ConfigError, match="HERO_VISION_CACHE__SECRET"):
            ServeApp(serve_config(args, free_port(), free_port())).start()
        monkeypatch.setenv("HERO_VISION_CACHE__SECRET", "")
        with pytest.raises(ConfigError):
            build_app(args)
        monkeypatch.setenv("HERO_VISION_CACHE__SECRET", "a-secret-for-this-test")
        build_app(args)
        monkeypatch.delenv("HERO_VISION_CACHE__SECRET")
        build_app({**args, "cache": {"url": url, "allow_unsigned": True}})
    VisionConfig.load(values={"cache": {"url": "memory://"}}).require_cache_secret()


def test_each_vision_replica_checks_its_cache_secret_in_its_own_environment(tiny_dir,
                                                                           monkeypatch):
    from hero_core.errors import ConfigError
    from services.vision.ingress import VisionIngress

    async def start(args) -> None:
        ingress = VisionIngress(object(), args)  # type: ignore[arg-type]
        await ingress.cache.store.close()
        await ingress.language.close()

    args = vision_config("redis://127.0.0.1:1/0", cache={"allow_unsigned": False})
    monkeypatch.delenv("HERO_VISION_CACHE__SECRET", raising=False)
    with pytest.raises(ConfigError, match="HERO_VISION_CACHE__SECRET"):
        asyncio.run(start(args))
    monkeypatch.setenv("HERO_VISION_CACHE__SECRET", "a-secret-for-this-test")
    asyncio.run(start(args))


def test_hero_serve_gives_its_vision_replicas_a_cache_secret_made_per_run(monkeypatch):
    """`LocalSystem` (hero serve, the demo, the load and integration tests) hands each
    run its own key through the replicas' environment, never this process's; a key
    already set is kept, so runs that share a Redis can share entries."""
    from services.local import CACHE_SECRET_ENV, LocalSystem

    def secret(**kwargs) -> str | None:
        return LocalSystem(redis_url="redis://127.0.0.1:1/0", **kwargs).vision_env.get(
            CACHE_SECRET_ENV)

    monkeypatch.delenv(CACHE_SECRET_ENV, raising=False)
    first, second = secret(), secret(vision_env={"HERO_VISION_API_TOKENS": "t"})
    assert first and second and first != second and len(first) == 64
    assert CACHE_SECRET_ENV not in os.environ
    assert secret(vision_env={CACHE_SECRET_ENV: "given"}) == "given"
    monkeypatch.setenv(CACHE_SECRET_ENV, "from-the-shell")
    assert secret() is None  # Ray's processes inherit the shell's
