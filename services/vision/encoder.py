"""The encoder deployment: vision tower + pruning ranking, batched across requests.

Each call brings one image's crops; `@serve.batch` gathers several images into one
tower pass, then every image is ranked (or selected) on its own, so one bad image
yields one error, never a failed batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from typing import Any

import torch
from ray import serve

from hero_core.cache import Origin, build_entry, entry_to_bytes
from hero_core.methods import RankedMethod
from hero_core.models import load_vlm, resolve_spec
from hero_core.packing import pack_tokens
from hero_core.serialization import DTYPES, packed_to_bytes
from hero_core.tiling import plan_grid
from services.vision.config import VisionConfig
from services.vision.metrics import VisionMetrics


@dataclasses.dataclass
class EncodeJob:
    """One image for the encoder."""

    pixels: torch.Tensor
    """`(K+1, 3, 336, 336)` normalised crops from `hero_core.tiling.tile_image`."""
    image_size: tuple[int, int]
    method: str
    ratio: float
    """Used only by methods that are not prefix-shaped."""
    origin: Origin
    """What the value is made from; recorded in it, checked when it is read back."""


@dataclasses.dataclass
class EncodeResult:
    """A cache value (ranked entry or packed tokens) and how long encoding took."""

    value: bytes
    encode_ms: float
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
        self.vision, self.text, self.tiling = vlm.vision_encoder(), vlm.text_encoder, vlm.tiling
        self.cache_dtype = DTYPES[self.config.cache.dtype]
        self.metrics = VisionMetrics()
        self.images_encoded = 0
        self.lock = threading.Lock()  # one tower pass at a time per replica
        # serve.batch adds these setters to the method; its typing does not show them
        self.encode.set_max_batch_size(  # type: ignore[attr-defined]
            self.config.batch.max_batch_size)
        self.encode.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            self.config.batch.batch_wait_timeout_s)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def encode(self, jobs: list[EncodeJob]) -> list[EncodeResult | Exception]:
        return await asyncio.to_thread(self.encode_now, jobs)

    def encode_now(self, jobs: list[EncodeJob]) -> list[EncodeResult | Exception]:
        """One tower pass over every job's crops, then per-image ranking or selection."""
        start = time.perf_counter()
        methods: list[Any] = []
        for job in jobs:
            try:
                methods.append(self.config.method(job.method))
            except Exception as exc:  # reported for this job only
                methods.append(exc)
        good = [m for m in methods if not isinstance(m, Exception)]
        layers = sorted({layer for m in good for layer in m.attention_layers()})
        keys = sorted({layer for m in good for layer in m.key_layers()})
        with self.lock:
            encoded = self.vision.encode(torch.cat([j.pixels for j in jobs]), layers, keys)
        results: list[EncodeResult | Exception] = []
        offset = 0
        for job, method in zip(jobs, methods, strict=True):
            crops = encoded.select(slice(offset, offset + job.pixels.shape[0]))
            offset += job.pixels.shape[0]
            try:
                if isinstance(method, Exception):
                    raise method
                value = self.cache_value(job, method, crops)
                results.append(EncodeResult(value, 0.0, len(jobs)))
            except Exception as exc:
                results.append(exc)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        for r in results:
            if isinstance(r, EncodeResult):
                r.encode_ms = elapsed_ms
        self.images_encoded += len(jobs)
        self.metrics.observe_batch(len(jobs), elapsed_ms)
        return results

    def cache_value(self, job: EncodeJob, method: Any, crops: Any) -> bytes:
        grid = plan_grid(job.image_size, self.tiling)
        if isinstance(method, RankedMethod):
            entry = build_entry(method.rank(crops, grid), crops.features, grid, self.cache_dtype)
            return entry_to_bytes(entry, method.compute_hash(), job.origin)
        selection = method.select(crops, grid, job.ratio, None)
        packed = pack_tokens(selection, crops.features, grid)
        packed.features = packed.features.to(self.cache_dtype)
        return packed_to_bytes(packed, job.origin.as_meta())

    async def embed_question(self, question: str) -> torch.Tensor | None:
        """CLIP text embedding `(P,)` of a question, or None without a text tower."""
        if self.text is None or not question.strip():
            return None
        text = self.text
        return await asyncio.to_thread(text.embed, question)

    def stats(self) -> dict[str, int]:
        """Counters for tests and debugging."""
        return {"images_encoded": self.images_encoded}
