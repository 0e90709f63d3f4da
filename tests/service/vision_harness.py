"""The vision ingress without Ray: the real encoder class called in process, a real
Redis, and (where a test needs one) a real language server."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import numpy as np
from PIL import Image

from hero_core.cache import image_digest
from hero_core.methods import create_method
from hero_core.stages import entry_origin
from services.local import free_port
from services.vision.encoder import Encoded, Encoder, EncodeRequest
from tests.conftest import MODELS_DIR


def vision_config(redis_url: str, **overrides: Any) -> dict[str, Any]:
    """Vision args on the tiny model; the language target is a closed port by default; no
    API tokens required unless the environment or `overrides` give some. The private
    test Redis runs without a cache secret unless a test sets one."""
    config: dict[str, Any] = {"model": "tiny", "models_dir": str(MODELS_DIR),
                              "language_target": f"127.0.0.1:{free_port()}",
                              "language_retries": 0, "allow_unauthenticated": True,
                              "cache": {"url": redis_url, "dtype": "float32",
                                        "allow_unsigned": True}}
    for key, value in overrides.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config


class InProcessEncoder:
    """`EncoderClient` over an `Encoder` object; keeps the requests it encodes."""

    def __init__(self, encoder: Encoder, delay_s: float = 0.0):
        self.encoder, self.delay_s = encoder, delay_s
        self.jobs: list[EncodeRequest] = []

    async def spec(self) -> Any:
        return self.encoder.spec()

    async def encode(self, request: EncodeRequest) -> Encoded:
        self.jobs.append(request)
        await asyncio.sleep(self.delay_s)

        def run() -> Any:
            return self.encoder.encode_now([self.encoder.prepare(request)])[0]

        result = await asyncio.to_thread(run)
        if isinstance(result, Exception):
            raise result
        return result

    async def embed_question(self, question: str) -> Any:
        return await self.encoder.embed_question(question)


class BatchingEncoder:
    """`EncoderClient` that gathers the requests arriving within `window_s` and encodes
    them in one `Encoder.encode_now` call, as `@serve.batch` does; each caller gets its
    own result or exception. Images in `sabotage` (digests) are ranked for a method
    reading a layer the tower does not have, so the encoder fails them."""

    def __init__(self, encoder: Encoder, window_s: float = 0.2,
                 sabotage: frozenset[str] = frozenset()):
        self.encoder, self.window_s, self.sabotage = encoder, window_s, sabotage
        self.batches: list[list[EncodeRequest]] = []
        self._pending: list[tuple[EncodeRequest, asyncio.Future[Any]]] = []
        self._flushing: asyncio.Future[None] | None = None

    async def spec(self) -> Any:
        return self.encoder.spec()

    async def encode(self, request: EncodeRequest) -> Encoded:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_later(self.window_s, self._flush_soon)
        result = await future
        if isinstance(result, Exception):
            raise result
        return result

    def _flush_soon(self) -> None:
        self._flushing = asyncio.ensure_future(self._flush())  # kept: tasks are weak refs

    def _job(self, request: EncodeRequest) -> Any:
        tiled, method, retention = self.encoder.prepare(request)
        if image_digest(request.image) in self.sabotage:
            method = create_method("fastervlm", layer=40)
        return tiled, method, retention

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        jobs = []
        for request, future in batch:
            try:
                jobs.append((self._job(request), future))
            except Exception as exc:  # not an image: fails before the tower, alone
                future.set_result(exc)
        self.batches.append([job for job, _ in jobs])
        results = await asyncio.to_thread(self.encoder.encode_now, [job for job, _ in jobs])
        for (_, future), result in zip(jobs, results, strict=True):
            future.set_result(result)

    async def embed_question(self, question: str) -> Any:
        return await self.encoder.embed_question(question)


async def key_of(source: Any, data: bytes, method: str = "", ratio: float = 0.0) -> str:
    """The cache key of an image's tokens at a `TokenSource` (its default method and
    retention unless given)."""
    config = source.config
    name = method or config.default_method
    spec = await source.spec()
    return entry_origin(config.method(name), ratio or config.default_retention,
                        image_digest(data), spec.encoder).key


def png_bytes(seed: int, size: tuple[int, int] = (500, 340)) -> bytes:
    """A distinct noise picture per seed, as PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class Context:
    """The part of a gRPC servicer context the ingress uses."""

    def __init__(self, metadata: dict[str, str] | None = None):
        self.metadata = metadata or {}
        self.code_set: Any = None
        self.details_set = ""
        self.trailing: dict[str, str] = {}

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self.metadata.items())

    def set_code(self, code: Any) -> None:
        self.code_set = code

    def set_details(self, details: str) -> None:
        self.details_set = details

    def set_trailing_metadata(self, metadata: list[tuple[str, str]]) -> None:
        self.trailing = dict(metadata)
