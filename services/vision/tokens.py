"""Pruned tokens for one request, by the two stages of `hero_core.stages`. Plain asyncio:
no gRPC or Ray here, so it is tested with an in-process encoder and a real Redis.

* A hit: the key (from the image's content hash, the encoder and the method), the
  cache's entry, `select_tokens` for this request's retention and question (whose
  embedding the encoder's text tower computes while the cache is read).
* A miss: what belongs to this request first (an image sent by id is fetched from the
  store; a Generate's prompt is checked by the language service, `pipeline`), then one
  encoding (stage 1, in the encoder deployment) shared by every request that misses the
  same entry meanwhile (`TokenCache.once`), stored, then `select_tokens`. A request
  that joins another's encoding never inherits what was checked for that one alone.

A stored entry either serves a correct answer or is dropped and rebuilt: it is checked
against what the encoder makes when it is read (`hero_core.cache.read_entry`), and a
selection from it that fails for this request's question drops it too (the image is
then encoded again, from the request's bytes or the stored image of an id; an id alone
that is no longer stored gets NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from typing import Protocol

import torch
from hero.vision.v1 import vision_pb2

from hero_core.cache import (
    Entry,
    EntrySpec,
    Origin,
    image_digest,
    image_key,
    read_entry,
    write_entry,
)
from hero_core.errors import ImageSizeError, InvalidInputError, InvalidRatioError
from hero_core.methods import PruningMethod
from hero_core.packing import PackedTokens
from hero_core.stages import Selected, check_ratio, entry_origin, select_tokens
from services.common.errors import NotFoundError, UnavailableError
from services.common.store import StoreError
from services.vision.cache import TokenCache
from services.vision.config import VisionConfig
from services.vision.encoder import Encoded, EncodeRequest
from services.vision.metrics import VisionMetrics

log = logging.getLogger("hero.vision")
DIGEST = re.compile(r"^[0-9a-f]{64}$")


class EncoderClient(Protocol):
    """The encoder deployment as the token path sees it."""

    async def spec(self) -> EntrySpec: ...
    async def encode(self, request: EncodeRequest) -> Encoded: ...
    async def embed_question(self, question: str) -> torch.Tensor | None: ...


class ImageNotFoundError(NotFoundError):
    """An image id the service no longer (or never) had."""


@dataclasses.dataclass
class Tokens:
    """Pruned tokens for one request and how they were obtained."""

    packed: PackedTokens
    image_id: str
    cache_hit: bool
    vision_ms: float
    """From the request's arrival at the token path to its tokens."""
    queue_ms: float
    """Of that, the wait for a place in the encoders (a miss that encoded)."""


@dataclasses.dataclass
class TokenRequest:
    """What one request's tokens are made of, and where its image comes from."""

    digest: str
    image: bytes | None
    """The image bytes; None for an image sent by id until a miss fetches them."""
    uploaded: bool
    method: PruningMethod
    method_name: str
    ratio: float
    origin: Origin
    question: asyncio.Future[torch.Tensor | None] | None
    """The question's embedding, under way; None when the method does not read it."""
    start: float = dataclasses.field(default_factory=time.perf_counter)

    async def question_embed(self) -> torch.Tensor | None:
        return None if self.question is None else await self.question

    def close(self) -> None:
        """Stop computing the question's embedding if nobody will read it (a failure of
        an embedding nobody read is not this request's)."""
        if self.question is None:
            return
        if not self.question.done():
            self.question.cancel()
        elif not self.question.cancelled():
            self.question.exception()  # retrieved


class TokenSource:
    """The cache or one encoding, then this request's selection."""

    def __init__(self, config: VisionConfig, encoder: EncoderClient, cache: TokenCache,
                 metrics: VisionMetrics):
        self.config, self.encoder, self.cache, self.metrics = config, encoder, cache, metrics
        self._spec: asyncio.Future[EntrySpec] | None = None

    async def spec(self) -> EntrySpec:
        """What the encoder's entries are made with, asked once (again after a failure)."""
        failed = self._spec is not None and self._spec.done() and (
            self._spec.cancelled() or self._spec.exception() is not None)
        if self._spec is None or failed:
            self._spec = asyncio.ensure_future(self.encoder.spec())
        return await asyncio.shield(self._spec)

    async def tokens(self, image: vision_pb2.ImageInput, options: vision_pb2.PruneOptions,
                     question: str, *, deadline: float | None = None) -> Tokens:
        """The request's tokens from the cache or, on a miss, one encoding; `deadline`
        (`time.monotonic()`) bounds waiting for another request's encoding."""
        want = await self.request(image, options, question)
        try:
            return await self.cached(want) or await self.encoded(want, deadline)
        finally:
            want.close()

    async def request(self, image: vision_pb2.ImageInput, options: vision_pb2.PruneOptions,
                      question: str) -> TokenRequest:
        """The request's method, retention, image and key; the question's embedding starts
        (`TokenRequest.close` ends it when it is not read)."""
        name = options.method or self.config.default_method
        method = self.config.method(name)
        ratio = check_ratio(options.retention or self.config.default_retention)
        digest, data = self._image(image)
        spec = await self.spec()
        embed = asyncio.ensure_future(self.encoder.embed_question(question)) \
            if method.uses_question and question.strip() else None
        return TokenRequest(digest, data, data is not None, method, name, ratio,
                            entry_origin(method, ratio, digest, spec.encoder), embed)

    async def cached(self, want: TokenRequest) -> Tokens | None:
        """A hit: the stored entry's selection for this request; None on a miss (or when
        the entry is unusable for this question: it is dropped)."""
        spec = await self.spec()
        entry = await self.cache.find(want.origin.key, lambda data: read_entry(
            data, want.origin, want.method, spec))
        if entry is None:
            return None
        question = await want.question_embed()
        try:
            selected = select_tokens(entry, want.method, want.ratio, question)
        except InvalidRatioError:
            raise  # this request's retention keeps nothing of the image: the client's
        except Exception as exc:
            await self.cache.discard(want.origin.key, f"unusable for this question: "
                                                      f"{exc!r:.200}")
            return None
        return self._tokens(want, selected, hit=True, queue_ms=0.0)

    async def encoded(self, want: TokenRequest, deadline: float | None) -> Tokens:
        """A miss: this request's image (an id's stored bytes), then the entry from the one
        encoding of it (stored by whoever made it), then the selection."""
        if want.image is None:
            want.image = await self._stored_image(want.digest)
        spec = await self.spec()
        made = await self.cache.once(
            want.origin.key, lambda: self._encode(want),
            lambda data: Made(read_entry(data, want.origin, want.method, spec), 0.0),
            deadline=deadline)
        selected = select_tokens(made.entry, want.method, want.ratio,
                                 await want.question_embed())
        return self._tokens(want, selected, hit=False, queue_ms=made.queue_ms)

    def _tokens(self, want: TokenRequest, selected: Selected, hit: bool,
                queue_ms: float) -> Tokens:
        vision_ms = (time.perf_counter() - want.start) * 1e3
        self.metrics.stage("vision", vision_ms)
        self.metrics.tokens_kept.observe(selected.packed.num_tokens)
        return Tokens(selected.packed, want.digest, hit, vision_ms, queue_ms)

    async def _encode(self, want: TokenRequest) -> tuple[Made, bytes]:
        """Stage 1 in the encoder deployment, and the bytes to store. Uploaded bytes are
        stored for later `image_id` requests once they have decoded as an image."""
        assert want.image is not None
        sent = time.perf_counter()
        encoded = await self.encoder.encode(EncodeRequest(want.image, want.method_name,
                                                          want.ratio))
        round_trip_ms = (time.perf_counter() - sent) * 1e3
        queue_ms = max(round_trip_ms - encoded.tile_ms - encoded.encode_ms, 0.0)
        self.metrics.stage("queue", queue_ms)
        if want.uploaded and self.config.cache.store_images:
            await self.cache.put(image_key(want.digest), want.image)
        return Made(encoded.entry, queue_ms), write_entry(encoded.entry)

    def _image(self, image: vision_pb2.ImageInput) -> tuple[str, bytes | None]:
        """The image's id, and its bytes when the request carries them."""
        which = image.WhichOneof("source")
        if which == "data":
            if not image.data:
                raise ImageSizeError("image is empty (0 bytes); send the encoded file's bytes")
            if len(image.data) > self.config.max_image_bytes:
                raise ImageSizeError(f"image is {len(image.data)} bytes, above max_image_bytes="
                                     f"{self.config.max_image_bytes}; send a smaller file")
            return image_digest(image.data), image.data
        if which == "image_id":
            if not DIGEST.match(image.image_id):
                raise InvalidInputError("image_id must be the 64-hex-digit id returned in "
                                        "accepted.image_id")
            return image.image_id, None
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
            self.cache.metrics.observe("corrupt")
            log.warning("stored image %s... does not hash to its id; dropped", digest[:12])
            await self.cache.invalidate(key)
            data = None
        if data is None:
            raise ImageNotFoundError(f"image {digest[:12]}... is not known here (expired or "
                                     "never sent); send the image bytes")
        return data


@dataclasses.dataclass
class Made:
    """The entry of a miss, and how long its encoding waited for the encoders (0 when
    another replica made it)."""

    entry: Entry
    queue_ms: float
