"""The encoder deployment: stage 1 of `hero_core.stages` (an image's cache entry) batched
across requests, and the CLIP text tower.

A call brings one image's encoded bytes, as the client sent them: the replica decodes
and tiles it in a worker thread, then `@serve.batch` gathers several images into one
tower pass and each image is ranked on its own, so one bad image yields one error,
never a failed batch. What crosses Ray is the file (not its pixels) and the entry.
`RayEncoder` is the deployment's handle as the ingress calls it.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import os
import threading
import time
from typing import Any

import torch
from ray import serve
from ray.serve.exceptions import BackPressureError

from hero_core.cache import Entry, EntrySpec
from hero_core.config import Limits
from hero_core.methods import PruningMethod
from hero_core.models import load_vlm, resolve_spec
from hero_core.serialization import DTYPES
from hero_core.stages import ImageStage, Tiled
from services.common.errors import OverloadedError, UnavailableError
from services.vision.config import VisionConfig
from services.vision.metrics import VisionMetrics

Job = tuple[Tiled, PruningMethod, float]
"""A decoded, tiled image, the method to rank it for and the retention (used only by
methods that are not prefix-shaped)."""


@dataclasses.dataclass
class EncodeRequest:
    """One image for the encoder."""

    image: bytes
    """The encoded image file, as the client sent it."""
    method: str
    retention: float
    """Used only by methods that are not prefix-shaped."""


@dataclasses.dataclass
class Encoded:
    """An image's cache entry and what making it took."""

    entry: Entry
    tile_ms: float
    """Decoding and tiling the image, in the replica."""
    encode_ms: float
    """The tower pass of the image's batch and the ranking."""
    batch_size: int


class Encoder:
    """Holds the vision tower and the CLIP text tower of one model."""

    def __init__(self, config: dict[str, Any]):
        self.config = VisionConfig.load(values=config)
        if self.config.device == "cpu":
            torch.set_num_threads(self.config.torch_threads or os.cpu_count() or 1)
        spec = resolve_spec(self.config.model, self.config.models_dir, self.config.device,
                            self.config.dtype)
        vlm = load_vlm(spec, parts="vision")
        limits = Limits(self.config.max_image_bytes, self.config.max_image_pixels,
                        self.config.max_prompt_chars)
        self.stage = ImageStage(vlm.vision_encoder(), vlm.tiling,
                                encoder_fp=vlm.encoder_fingerprint(), limits=limits,
                                dtype=DTYPES[self.config.cache.dtype])
        self.text = vlm.text_encoder
        self.metrics = VisionMetrics()
        self.images_encoded = 0
        self.lock = threading.Lock()  # one tower pass at a time per replica
        # serve.batch adds these setters to the method; its typing does not show them
        self._batch.set_max_batch_size(  # type: ignore[attr-defined]
            self.config.batch.max_batch_size)
        self._batch.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            self.config.batch.batch_wait_timeout_s)

    def spec(self) -> EntrySpec:
        """What this encoder's entries are made with (the ingress reads entries with it)."""
        return self.stage.spec

    def prepare(self, request: EncodeRequest) -> Job:
        """Decode and tile the request's image (CPU); `InvalidInputError` for bytes that
        are not an image within the limits."""
        method = self.config.method(request.method)
        return self.stage.tile(request.image), method, request.retention

    async def encode(self, request: EncodeRequest) -> Encoded | Exception:
        """The image's entry, or this image's own failure as a value (the caller raises
        it: a typed error, not one of Ray's)."""
        start = time.perf_counter()
        try:
            job = await asyncio.to_thread(self.prepare, request)
        except Exception as exc:
            return exc
        tile_ms = (time.perf_counter() - start) * 1e3
        made = await self._batch(job)
        if isinstance(made, Encoded):
            made.tile_ms = tile_ms
        return made

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _batch(self, jobs: list[Job]) -> list[Encoded | Exception]:
        return await asyncio.to_thread(self.encode_now, jobs)

    def encode_now(self, jobs: list[Job]) -> list[Encoded | Exception]:
        """One tower pass over every job's crops, then each image ranked alone."""
        start = time.perf_counter()
        with self.lock:
            entries = self.stage.encode(jobs)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        self.images_encoded += len(jobs)
        self.metrics.observe_batch(len(jobs), elapsed_ms)
        return [Encoded(e, 0.0, elapsed_ms, len(jobs)) if isinstance(e, Entry) else e
                for e in entries]

    async def embed_question(self, question: str) -> torch.Tensor | None:
        """CLIP text embedding `(P,)` of a question, or None without a text tower."""
        if self.text is None or not question.strip():
            return None
        text = self.text
        return await asyncio.to_thread(text.embed, question)

    def stats(self) -> dict[str, int]:
        """Counters for tests and debugging."""
        return {"images_encoded": self.images_encoded}


class RayEncoder:
    """The encoder deployment's handle as a `tokens.EncoderClient`; its failures become
    retryable statuses."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def spec(self) -> EntrySpec:
        return await self._call(self.handle.spec.remote())  # type: ignore[no-any-return]

    async def encode(self, request: EncodeRequest) -> Encoded:
        """One image's encoding, called outside the Serve request that started it: every
        request waiting for this image shares it, and Ray cancels a request's calls to
        other deployments when that request is cancelled, which would fail the others."""
        async def call() -> Any:  # runs, and makes the call, in an empty context
            return await self._call(self.handle.encode.remote(request))

        result = await asyncio.get_running_loop().create_task(call(),
                                                              context=contextvars.Context())
        if isinstance(result, Exception):  # this image's own failure
            raise result
        return result  # type: ignore[no-any-return]

    async def embed_question(self, question: str) -> torch.Tensor | None:
        return await self._call(self.handle.embed_question.remote(question))  # type: ignore[no-any-return]

    @staticmethod
    async def _call(response: Any) -> Any:
        try:
            return await response
        except BackPressureError as exc:  # the encoders' queues are full
            raise OverloadedError("the encoders are at capacity; retry with backoff") from exc
        except Exception as exc:  # replica died or Ray failed: the caller may retry
            raise UnavailableError(f"the encoder is unavailable ({type(exc).__name__}); "
                                   "retry") from exc
