"""The ingress deployment: the public hero.vision.v1.VisionService behind Serve's gRPC proxy.

Per request: validate, find the image's pruned tokens (Redis, else encode once via
the encoder deployment and store), apply the request's budgets, then either return
the tokens (`Prune`) or stream them to the language service and the answer back
(`Generate`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.vision.v1 import vision_pb2
from ray.serve.exceptions import BackPressureError

from hero_core.cache import (
    entry_from_bytes,
    image_digest,
    image_key,
    request_fingerprint,
    select_from_entry,
    tokens_key,
)
from hero_core.config import Limits
from hero_core.errors import HeroError, ImageSizeError, InvalidInputError
from hero_core.image import decode_image
from hero_core.methods import PruningMethod, RankedMethod
from hero_core.models import encoder_fingerprint, load_tiling, resolve_spec
from hero_core.packing import PackedTokens
from hero_core.pipeline import check_ratio
from hero_core.serialization import packed_from_bytes
from hero_core.tiling import tile_image
from services.common.codec import DTYPE_NAMES, encode_tensor, layout_message
from services.common.errors import (
    OverloadedError,
    UnauthenticatedError,
    UnavailableError,
    status_for,
)
from services.common.params import check_generation_params, turns_of
from services.common.store import open_store
from services.common.tls import channel_credentials
from services.sdk.language import LanguageClient
from services.sdk.vision import TIMEOUT_HEADER
from services.vision.cache import TokenCache
from services.vision.config import VisionConfig
from services.vision.encoder import EncodeJob, EncodeResult
from services.vision.metrics import VisionMetrics

log = logging.getLogger("hero.vision")
DIGEST = re.compile(r"^[0-9a-f]{64}$")


def call_metadata_of(grpc_context: Any) -> dict[str, Any]:
    """The call's metadata as a dict (empty outside a gRPC call, e.g. in tests)."""
    return dict(grpc_context.invocation_metadata()) if grpc_context else {}


def client_deadline(grpc_context: Any, arrival: float) -> float | None:
    """The client's deadline on the `time.perf_counter()` clock, from the `hero-timeout-ms`
    metadata the SDK sends (Serve's proxy does not pass gRPC deadlines on)."""
    raw = str(call_metadata_of(grpc_context).get(TIMEOUT_HEADER, ""))
    if not raw.isdigit():
        return None
    return arrival + int(raw) / 1000


def language_status(exc: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    """The status to give a client for a failed language call. A stream that broke while
    the request was still being written surfaces in grpc as INTERNAL "Internal error from
    Core": the language service went away (or refused mid-upload), so it is UNAVAILABLE."""
    if exc.code() == grpc.StatusCode.INTERNAL and "from Core" in (exc.details() or ""):
        return grpc.StatusCode.UNAVAILABLE, "language service: the stream broke; retry"
    return exc.code(), f"language service: {exc.details()}"


async def encoder_call(response: Any) -> Any:
    """Await a call to the encoder deployment, its failures as retryable statuses."""
    try:
        return await response
    except BackPressureError as exc:  # the encoders' queues are full
        raise OverloadedError("the encoders are at capacity; retry with backoff") from exc
    except Exception as exc:  # replica died or Ray failed: the caller may retry
        raise UnavailableError(f"the encoder is unavailable ({type(exc).__name__}); "
                               "retry") from exc


class ImageNotFoundError(HeroError):
    """An image id the service no longer (or never) had."""


@dataclasses.dataclass
class Tokens:
    """Pruned tokens for one request and how they were obtained."""

    packed: PackedTokens
    image_id: str
    cache_hit: bool
    vision_ms: float
    queue_ms: float


class VisionIngress:
    """Validation, cache, orchestration and streaming; no model weights of its own."""

    def __init__(self, encoder: Any, config: dict[str, Any]):
        from transformers import AutoConfig

        self.config = VisionConfig.model_validate(config)
        self.encoder = encoder
        spec = resolve_spec(self.config.model, self.config.models_dir, self.config.device,
                            self.config.dtype)
        model_config = AutoConfig.from_pretrained(spec.model,
                                                  local_files_only=spec.local_files_only)
        self.tiling = load_tiling(spec, int(model_config.vision_config.patch_size))
        self.encoder_fp = encoder_fingerprint(spec, model_config.vision_feature_layer,
                                              self.tiling)
        self.metrics = VisionMetrics()
        cache = self.config.cache
        store = open_store(cache.url, cache.timeout_s, password=os.environ.get(cache.password_env),
                           tls_ca_file=cache.tls_ca_file)
        self.cache = TokenCache(store, self.metrics, cache.ttl_s, cache.max_entry_bytes)
        tls = None
        if self.config.language_tls_ca_file:
            tls = channel_credentials(self.config.language_tls_ca_file,
                                      self.config.language_tls_cert_file,
                                      self.config.language_tls_key_file)
        self.language = LanguageClient(self.config.language_target, credentials=tls)
        self.limits = Limits(self.config.max_image_bytes, self.config.max_image_pixels,
                             self.config.max_prompt_chars)
        raw = os.environ.get(self.config.api_tokens_env, "")
        self.tokens_accepted = [t.strip().encode() for t in raw.split(",") if t.strip()]

    def _authorize(self, grpc_context: Any) -> None:
        """Require `authorization: Bearer <token>` when tokens are configured."""
        if not self.tokens_accepted:
            return
        scheme, _, token = str(call_metadata_of(grpc_context).get("authorization",
                                                                  "")).partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, t)
                                                  for t in self.tokens_accepted):
            raise UnauthenticatedError("send a valid token as 'authorization: Bearer <token>'")

    # ---- RPCs -------------------------------------------------------------------------

    async def Generate(self, request: vision_pb2.GenerateRequest,
                       grpc_context: Any = None) -> AsyncIterator[vision_pb2.GenerateEvent]:
        arrival = time.perf_counter()
        request_id = request.request_id[:128] or uuid.uuid4().hex
        try:
            self._authorize(grpc_context)
            which = request.WhichOneof("input")
            turns = turns_of(request.prompt if which == "prompt" else None,
                             list(request.chat.messages) if which == "chat" else None,
                             self.config.max_prompt_chars)
            check_generation_params(request.params, 1 << 20)
            question = next((t for r, t in reversed(turns) if r == "user"), "")
            deadline = client_deadline(grpc_context, arrival)
            tokens = await self.tokens(request.image, request.prune, question)
            yield vision_pb2.GenerateEvent(accepted=self._accepted(tokens))
            async for event in self._answer(request, request_id, turns, tokens, arrival,
                                            deadline):
                yield event
            self.metrics.requests.inc(1, tags={"rpc": "Generate", "code": "OK"})
        except Exception as exc:
            self._fail(exc, request_id, "Generate", grpc_context)
            raise

    async def Prune(self, request: vision_pb2.PruneRequest,
                    grpc_context: Any = None) -> AsyncIterator[vision_pb2.PruneResponse]:
        request_id = request.request_id[:128] or uuid.uuid4().hex
        try:
            self._authorize(grpc_context)
            if len(request.question) > self.config.max_prompt_chars:
                turns_of(request.question, None, self.config.max_prompt_chars)
            dtype = request.dtype or common_pb2.DTYPE_FLOAT16
            if dtype not in DTYPE_NAMES.values():
                raise InvalidInputError(f"dtype {dtype} is not one of float32, float16, "
                                        "bfloat16, int8")
            tokens = await self.tokens(request.image, request.prune, request.question)
            yield vision_pb2.PruneResponse(accepted=self._accepted(tokens))
            header, chunks = encode_tensor(tokens.packed.features, dtype)
            yield vision_pb2.PruneResponse(tokens=vision_pb2.PrunedTokens(
                layout=layout_message(tokens.packed), features=header))
            for chunk in chunks:
                yield vision_pb2.PruneResponse(chunk=chunk)
            self.metrics.requests.inc(1, tags={"rpc": "Prune", "code": "OK"})
        except Exception as exc:
            self._fail(exc, request_id, "Prune", grpc_context)
            raise

    def _fail(self, exc: BaseException, request_id: str, rpc: str, grpc_context: Any) -> None:
        if isinstance(exc, grpc.aio.AioRpcError):  # the language service's own verdict
            code, message = language_status(exc)
        elif isinstance(exc, ImageNotFoundError):
            code, message = grpc.StatusCode.NOT_FOUND, str(exc)
        else:
            code, message = status_for(exc, request_id)
        self.metrics.requests.inc(1, tags={"rpc": rpc, "code": code.name})
        if grpc_context is not None:
            grpc_context.set_code(code)
            grpc_context.set_details(message)

    @staticmethod
    def _accepted(tokens: Tokens) -> vision_pb2.Accepted:
        return vision_pb2.Accepted(image_id=tokens.image_id, cache_hit=tokens.cache_hit,
                                   tokens_kept=tokens.packed.num_tokens,
                                   tokens_total=tokens.packed.full_tokens)

    async def _answer(self, request: vision_pb2.GenerateRequest, request_id: str,
                      turns: tuple[tuple[str, str], ...], tokens: Tokens, arrival: float,
                      deadline: float | None) -> AsyncIterator[vision_pb2.GenerateEvent]:
        """Stream the answer; a call that fails UNAVAILABLE before its first text is retried
        with backoff (nothing was sent yet, so a retry is safe). The language call ends at
        the client's deadline when the client sent one."""
        params, first_ms = request.params, 0.0
        for attempt in range(self.config.language_retries + 1):
            timeout = self.config.language_timeout_s
            if deadline is not None:
                timeout = min(timeout, max(deadline - time.perf_counter(), 0.001))
            parts = self.language.generate(
                tokens.packed, messages=turns, max_new_tokens=params.max_new_tokens,
                temperature=params.temperature, top_p=params.top_p, seed=params.seed,
                stop=list(params.stop), ignore_eos=params.ignore_eos, request_id=request_id,
                dtype=self.config.cache.dtype, timeout=timeout)
            try:
                async for part in parts:
                    if isinstance(part, common_pb2.Usage):
                        yield self._usage(part, tokens, first_ms)
                    else:
                        if not first_ms:
                            first_ms = (time.perf_counter() - arrival) * 1e3
                        yield vision_pb2.GenerateEvent(delta=part)
                return
            except grpc.aio.AioRpcError as exc:
                retry = (not first_ms and language_status(exc)[0] == grpc.StatusCode.UNAVAILABLE
                         and attempt < self.config.language_retries)
                if not retry:
                    raise
                log.warning("language service unavailable, retry %d: %s", attempt + 1,
                            exc.details())
                await asyncio.sleep(self.config.language_backoff_s * 2 ** attempt)

    def _usage(self, part: common_pb2.Usage, tokens: Tokens,
               first_ms: float) -> vision_pb2.GenerateEvent:
        sent = tokens.packed.features.numel() * tokens.packed.features.element_size()
        self.metrics.bytes_sent.observe(sent)
        self.metrics.stage("ttft", first_ms)
        return vision_pb2.GenerateEvent(usage=vision_pb2.VisionUsage(
            language=part, vision_ms=tokens.vision_ms, queue_ms=tokens.queue_ms,
            ttft_ms=first_ms, bytes_sent=sent))

    # ---- tokens: cache or encode ------------------------------------------------------

    async def tokens(self, image: vision_pb2.ImageInput, options: vision_pb2.PruneOptions,
                     question: str) -> Tokens:
        """Pruned tokens for this image and request (features in the cache dtype)."""
        start = time.perf_counter()
        method = self.config.method(options.method or self.config.default_method)
        ratio = check_ratio(options.retention or self.config.default_retention)
        data, digest = self._image_source(image)
        timing: dict[str, float] = {}

        async def encode() -> bytes:
            return await self._encode(data, digest, method, ratio, timing)

        method_fp = method.compute_hash()
        if isinstance(method, RankedMethod):
            key = tokens_key(digest, self.encoder_fp, method_fp)
            # The text tower runs while the cache is read (or the image encoded).
            embed = asyncio.create_task(self._embed(question)) if method.uses_question \
                else None
            try:
                entry, hit = await self.cache.get_or_create(
                    key, encode, lambda b: entry_from_bytes(b, method_fp))
                question_embed = await embed if embed is not None else None
            finally:
                if embed is not None and not embed.done():
                    embed.cancel()
            packed = select_from_entry(entry, method, entry.grid(self.tiling), ratio,
                                       question_embed)
        else:
            key = tokens_key(digest, self.encoder_fp, method_fp, request_fingerprint(ratio, None))
            packed, hit = await self.cache.get_or_create(key, encode, packed_from_bytes)
        vision_ms = (time.perf_counter() - start) * 1e3
        self.metrics.stage("vision", vision_ms)
        self.metrics.tokens_kept.observe(packed.num_tokens)
        return Tokens(packed, digest, hit, vision_ms, timing.get("queue_ms", 0.0))

    async def _embed(self, question: str) -> Any:
        if not question.strip():
            return None
        return await encoder_call(self.encoder.embed_question.remote(question))

    def _image_source(self, image: vision_pb2.ImageInput) -> tuple[bytes | None, str]:
        which = image.WhichOneof("source")
        if which == "data":
            if not image.data:
                raise ImageSizeError("image is empty (0 bytes); send the encoded file's bytes")
            if len(image.data) > self.limits.max_image_bytes:
                raise ImageSizeError(f"image is {len(image.data)} bytes, above max_image_bytes="
                                     f"{self.limits.max_image_bytes}; send a smaller file")
            return image.data, image_digest(image.data)
        if which == "image_id":
            if not DIGEST.match(image.image_id):
                raise InvalidInputError("image_id must be the 64-hex-digit id returned in "
                                        "accepted.image_id")
            return None, image.image_id
        raise InvalidInputError("send the image bytes or an image_id")

    async def _encode(self, data: bytes | None, digest: str, method: PruningMethod,
                      ratio: float, timing: dict[str, float]) -> bytes:
        """Decode, tile and encode one image (the cache miss path)."""
        if data is None:
            data = await self.cache.get(image_key(digest))
            if data is None:
                raise ImageNotFoundError(f"image {digest[:12]}... is not known here (expired or "
                                         "never sent); send the image bytes")
        elif self.config.cache.store_images:
            await self.cache.put(image_key(digest), data)
        picture = await asyncio.to_thread(decode_image, data, self.limits)
        pixels, grid = await asyncio.to_thread(tile_image, picture, self.tiling)
        sent = time.perf_counter()
        job = EncodeJob(pixels, grid.image_size, method.name, ratio)
        result: EncodeResult | Exception = await encoder_call(self.encoder.encode.remote(job))
        if isinstance(result, Exception):
            raise result
        round_trip_ms = (time.perf_counter() - sent) * 1e3
        timing["queue_ms"] = max(round_trip_ms - result.encode_ms, 0.0)
        self.metrics.stage("queue", timing["queue_ms"])
        return result.value
