"""Real language servers on free loopback ports, run in a background event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest
from hero.language.v1 import language_pb2_grpc

from hero_core.generation import format_prompt, generate_greedy
from hero_core.methods import create_method
from services.common.store import open_store
from services.local import (
    RedisProcess,
    free_port,  # noqa: F401  (re-exported for the tests)
)
from services.vision.cache import CountingMetrics, TokenCache


class ServerThread:
    """A language server on 127.0.0.1:<free port> with its own event loop thread."""

    def __init__(self, config, load_engine: Callable):
        from services.language.server import start_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pending = asyncio.run_coroutine_threadsafe(start_server(config, load_engine),
                                                        self.loop)
        self.running = None

    def ready(self, timeout: float = 120):
        self.running = self.pending.result(timeout)
        return self

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def servicer(self):
        return self.running.servicer

    def stub(self) -> language_pb2_grpc.LanguageServiceStub:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        return language_pb2_grpc.LanguageServiceStub(channel)

    def stop(self, grace: float = 0.0) -> None:
        """Stop the server and its loop; nothing when stopped already."""
        if not self.thread.is_alive():
            return
        if self.running:
            asyncio.run_coroutine_threadsafe(self.running.stop(grace), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def language_config(**overrides):
    """Test settings: free ports, no warm-up, and no API tokens required unless the
    environment or `overrides` give some (authentication is off explicitly)."""
    from services.language.config import LanguageConfig

    settings = {"port": 0, "metrics_port": 0, "warmup": False,
                "allow_unauthenticated": True, **overrides}
    return LanguageConfig(**settings)


def language_server(model, **overrides) -> ServerThread:
    """A language server with the engine its config names, around the shared model."""
    from services.language.app import build_engine

    config = language_config(**overrides)
    return ServerThread(config, lambda: build_engine(config, model)).ready()


@pytest.fixture(scope="module")
def server(language_model) -> Iterator[ServerThread]:
    srv = language_server(language_model, max_queue=2)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def astronaut_tokens(pruner, photo):
    """HERO-pruned tokens of a real photo, from hero_core."""
    return pruner.prune(photo, "What is the astronaut holding?", create_method("hero"),
                        0.111).packed


@pytest.fixture(scope="session")
def reference(vlm):
    def run(packed, question, max_new_tokens):
        prompt = format_prompt(vlm.tokenizer, question)
        tokens = generate_greedy(vlm.model, vlm.tokenizer, packed, prompt, vlm.image_token_id,
                                 max_new_tokens)
        eos = vlm.model.generation_config.eos_token_id
        return tokens[: tokens.index(eos)] if eos in tokens else tokens
    return run


@pytest.fixture(scope="module")
def encoder_object(tiny_dir):
    """The vision encoder replica's object, in this process (memory-only cache settings)."""
    from services.vision.encoder import Encoder
    from tests.service.vision_harness import vision_config

    return Encoder(vision_config("memory://"))


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A private Redis shared by one module's tests."""
    server = RedisProcess(maxmemory="64mb").start()
    yield server.url
    server.stop()


@pytest.fixture()
def redis_server() -> Iterator[RedisProcess]:
    """A private Redis server process on a free loopback port, for one test."""
    server = RedisProcess(maxmemory="64mb").start()
    yield server
    server.stop()


def cache_for(url: str, timeout_s: float = 0.25, **kwargs
              ) -> tuple[TokenCache, CountingMetrics]:
    """A token cache over the store at `url` (calls time out after `timeout_s`), with
    metrics that count its events."""
    metrics = CountingMetrics()
    settings = {"ttl_s": 60.0, "max_entry_bytes": 1 << 20, **kwargs}
    return TokenCache(open_store(url, timeout_s), metrics, settings["ttl_s"],
                      settings["max_entry_bytes"]), metrics
