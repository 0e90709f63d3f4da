"""Pruned tokens for one request: the image's cache entry (or one encoding of it), then
this request's budgets. Plain asyncio: no gRPC or Ray here, so it is tested with an
in-process encoder and a real Redis; the ingress adapts it to the RPCs.

A miss is encoded once however many requests want it (`TokenCache.get_or_create`).
What belongs to one request alone (its image bytes fetched by id, its prompt checked
against the language service) is done before it encodes, never by the requests that
wait for it, so they never inherit its failure.

A stored value either serves a correct answer or is dropped and rebuilt: it is checked
against what this service's encoder makes when it is decoded (`check_entry`,
`check_packed`), and any failure, in decoding or in this request's selection from it,
counts it corrupt: it is deleted and the image encoded again (from the request's
bytes, or the stored image of an id; an id alone that is no longer stored gets
NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import torch
from hero.vision.v1 import vision_pb2

from hero_core.cache import (
    EntryShape,
    Origin,
    RankedEntry,
    check_entry,
    entry_from_bytes,
    image_digest,
    image_key,
    request_fingerprint,
    select_from_entry,
    stored_grid,
    tokens_key,
)
from hero_core.config import Limits
from hero_core.errors import (
    CorruptPayloadError,
    ImageSizeError,
    InvalidInputError,
    LayoutError,
)
from hero_core.image import decode_image
from hero_core.methods import PruningMethod, RankedMethod
from hero_core.methods.base import Ranking
from hero_core.packing import PackedTokens, check_packed
from hero_core.pipeline import check_ratio
from hero_core.serialization import DTYPES, packed_from_bytes
from hero_core.tiling import TileGrid, TilingSpec, tile_image
from services.common.errors import NotFoundError, UnavailableError
from services.common.store import StoreError
from services.vision.cache import TokenCache
from services.vision.config import VisionConfig
from services.vision.encoder import EncodeJob, EncodeResult
from services.vision.metrics import VisionMetrics

log = logging.getLogger("hero.vision")
DIGEST = re.compile(r"^[0-9a-f]{64}$")


class EncoderClient(Protocol):
    """The encoder deployment as the token path sees it."""

    async def encode(self, job: EncodeJob) -> EncodeResult: ...
    async def embed_question(self, question: str) -> torch.Tensor | None: ...


class ImageNotFoundError(NotFoundError):
    """An image id the service no longer (or never) had."""


@dataclasses.dataclass
class ImageSource:
    """Where a request's image comes from: its bytes, or only its id (bytes fetched from
    the store when the image must be encoded)."""

    digest: str
    data: bytes | None
    uploaded: bool


@dataclasses.dataclass
class Tokens:
    """Pruned tokens for one request and how they were obtained."""

    packed: PackedTokens
    image_id: str
    cache_hit: bool
    vision_ms: float
    queue_ms: float


class TokenSource:
    """Cache lookup or encoding, then selection, for one request at a time."""

    def __init__(self, config: VisionConfig, encoder: EncoderClient, cache: TokenCache,
                 tiling: TilingSpec, encoder_fp: str, feature_dim: int,
                 metrics: VisionMetrics | Any, embed_dim: int):
        """`feature_dim`, `embed_dim`: widths of the encoder's features and crop
        embeddings, which stored values must have."""
        self.config, self.encoder, self.cache = config, encoder, cache
        self.tiling, self.encoder_fp, self.feature_dim = tiling, encoder_fp, feature_dim
        self.metrics = metrics
        self.limits = Limits(config.max_image_bytes, config.max_image_pixels,
                             config.max_prompt_chars)
        self.shape = EntryShape(feature_dim, DTYPES[config.cache.dtype], embed_dim,
                                config.max_image_pixels)

    async def tokens(self, image: vision_pb2.ImageInput, options: vision_pb2.PruneOptions,
                     question: str, *, check: Callable[[], Awaitable[None]] | None = None,
                     deadline: float | None = None) -> Tokens:
        """Pruned tokens for this image and request (features in the cache dtype).

        `check` runs before this request encodes a miss itself (not on a hit, nor when it
        joins another request's encoding); `deadline` (`time.monotonic()`) bounds waiting
        for another request's encoding.
        """
        start = time.perf_counter()
        method = self.config.method(options.method or self.config.default_method)
        ratio = check_ratio(options.retention or self.config.default_retention)
        source = self._image_source(image)
        method_fp = method.compute_hash()
        ranked = isinstance(method, RankedMethod)
        request_fp = "" if ranked else request_fingerprint(ratio, None)
        key = tokens_key(source.digest, self.encoder_fp, method_fp, request_fp)
        origin = Origin(source.digest, self.encoder_fp,
                        f"{method_fp}:{request_fp}" if request_fp else method_fp)
        timing: dict[str, float] = {}

        checked: list[bool] = []  # a rebuild after a dropped value does not ask again

        async def prepare() -> None:
            if check is not None and not checked:
                await check()
                checked.append(True)
            if source.data is None:
                source.data = await self._stored_image(source.digest)

        async def encode() -> bytes:
            assert source.data is not None  # prepare() ran
            return await self._encode(source, origin, method, ratio, timing)

        if ranked:
            packed, hit = await self._ranked(key, encode, prepare, method, origin, ratio,
                                             question, deadline)
        else:
            packed, hit = await self.cache.get_or_create(
                key, encode, lambda b: self._packed(b, origin), prepare=prepare,
                deadline=deadline)
        vision_ms = (time.perf_counter() - start) * 1e3
        self.metrics.stage("vision", vision_ms)
        self.metrics.tokens_kept.observe(packed.num_tokens)
        return Tokens(packed, source.digest, hit, vision_ms, timing.get("queue_ms", 0.0))

    async def _ranked(self, key: str, encode: Callable[[], Awaitable[bytes]],
                      prepare: Callable[[], Awaitable[None]], method: RankedMethod,
                      origin: Origin, ratio: float, question: str,
                      deadline: float | None) -> tuple[PackedTokens, bool]:
        """A prefix-shaped method's tokens: the image's entry (cached or encoded), then this
        question's budgets. The text tower runs while the cache is read (or the image
        encoded). A stored entry this question cannot be served from is dropped and the
        image encoded again (once: a second unusable entry is an UNAVAILABLE to retry)."""
        embed = asyncio.create_task(self._embed(question)) if method.uses_question else None
        try:
            for _ in range(2):
                (entry, grid), hit = await self.cache.get_or_create(
                    key, encode, lambda b: self._entry(b, method, origin, ratio),
                    prepare=prepare, deadline=deadline)
                question_embed = await embed if embed is not None else None
                try:
                    return select_from_entry(entry, method, grid, ratio, question_embed), hit
                except Exception as exc:
                    if not hit:
                        raise  # made just now by this service's encoder: a real failure
                    await self.cache.discard(key, f"unusable for this question: {exc!r:.200}")
                    failure = exc
            raise UnavailableError("this image's cached tokens were unusable twice; "
                                   "retry") from failure
        finally:
            if embed is not None and not embed.done():
                embed.cancel()

    def _entry(self, data: bytes, method: RankedMethod, origin: Origin,
               ratio: float) -> tuple[RankedEntry, TileGrid]:
        """A cached ranked entry and its grid, checked to be from `origin`, to be what this
        service's encoder and `method` make for its image, and to give budgets:
        `CorruptPayloadError` (dropped and re-encoded by the cache) otherwise."""
        entry = entry_from_bytes(data, origin.method, origin)
        grid = check_entry(entry, method, self.tiling, self.shape)
        try:
            budgets = method.budgets(Ranking(entry.order, entry.state), grid, ratio, None)
        except Exception as exc:  # state of the wrong shape for this method
            raise CorruptPayloadError(f"entry state is unusable: {type(exc).__name__}") from exc
        if len(budgets) != grid.num_crops:
            raise CorruptPayloadError("entry state gives budgets for another grid")
        return entry, grid

    def _packed(self, data: bytes, origin: Origin) -> PackedTokens:
        """Cached packed tokens, checked to be from `origin` and a valid layout of finite
        features in the cache dtype."""
        packed = packed_from_bytes(data, origin.check)
        grid = stored_grid(packed.image_size, self.tiling, self.shape.max_pixels)
        try:
            check_packed(packed, grid, self.feature_dim)
        except LayoutError as exc:
            raise CorruptPayloadError(f"cached layout is invalid: {exc}") from exc
        if packed.features.dtype != self.shape.dtype \
                or not bool(torch.isfinite(packed.features).all()):
            raise CorruptPayloadError(f"cached features are {packed.features.dtype}, not "
                                      f"finite {self.shape.dtype}")
        return packed

    async def _embed(self, question: str) -> Any:
        if not question.strip():
            return None
        return await self.encoder.embed_question(question)

    def _image_source(self, image: vision_pb2.ImageInput) -> ImageSource:
        which = image.WhichOneof("source")
        if which == "data":
            if not image.data:
                raise ImageSizeError("image is empty (0 bytes); send the encoded file's bytes")
            if len(image.data) > self.limits.max_image_bytes:
                raise ImageSizeError(f"image is {len(image.data)} bytes, above max_image_bytes="
                                     f"{self.limits.max_image_bytes}; send a smaller file")
            return ImageSource(image_digest(image.data), image.data, uploaded=True)
        if which == "image_id":
            if not DIGEST.match(image.image_id):
                raise InvalidInputError("image_id must be the 64-hex-digit id returned in "
                                        "accepted.image_id")
            return ImageSource(image.image_id, None, uploaded=False)
        raise InvalidInputError("send the image bytes or an image_id")

    async def _stored_image(self, digest: str) -> bytes:
        """The bytes of an image sent earlier, checked against its id."""
        key = image_key(digest)
        try:
            data = await self.cache.get(key, strict=True)
        except StoreError as exc:
            raise UnavailableError("the image store is unreachable, so an image_id cannot be "
                                   "looked up now; retry, or send the image bytes") from exc
        if data is not None and image_digest(data) != digest:
            self.metrics.observe("corrupt")
            log.warning("stored image %s... does not hash to its id; dropped", digest[:12])
            await self.cache.invalidate(key)
            data = None
        if data is None:
            raise ImageNotFoundError(f"image {digest[:12]}... is not known here (expired or "
                                     "never sent); send the image bytes")
        return data

    async def _encode(self, source: ImageSource, origin: Origin, method: PruningMethod,
                      ratio: float, timing: dict[str, float]) -> bytes:
        """Decode, tile and encode one image (the cache miss path). Uploaded bytes are
        stored for later `image_id` requests only once they decode as an image."""
        assert source.data is not None
        picture = await asyncio.to_thread(decode_image, source.data, self.limits)
        if source.uploaded and self.config.cache.store_images:
            await self.cache.put(image_key(source.digest), source.data)
        pixels, grid = await asyncio.to_thread(tile_image, picture, self.tiling)
        sent = time.perf_counter()
        job = EncodeJob(pixels, grid.image_size, method.name, ratio, origin)
        result = await self.encoder.encode(job)
        round_trip_ms = (time.perf_counter() - sent) * 1e3
        timing["queue_ms"] = max(round_trip_ms - result.encode_ms, 0.0)
        self.metrics.stage("queue", timing["queue_ms"])
        return result.value
