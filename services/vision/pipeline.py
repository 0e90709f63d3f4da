"""The vision service's requests as plain async calls, independent of how they arrive.

`VisionPipeline.generate` and `VisionPipeline.prune` take the request messages of
hero.vision.v1 and yield its response messages; they raise the typed errors of
`hero_core.errors` and `services.common.errors` only (a front door maps them to its
status codes: the gRPC ingress with `services.common.errors.status_for`). Every front
door (the gRPC `VisionService` of `ingress.py`, an HTTP one) calls these.

Generate, straight through: check every field; the tokens are selected for the
conversation's first question (`first_question`), so every turn of a conversation
sends the same ones; a hit is the cache's entry and this
request's selection (`tokens.TokenSource.cached`); a miss first asks the language
service whether it takes this prompt and these parameters (`Validate`), so no image is
encoded for a request it would refuse, then takes the tokens of the one encoding
(`TokenSource.encoded`); then streams the tokens to the language service and its answer
back. A language call that fails UNAVAILABLE before any text is retried with backoff
within the client's deadline, each retry first waiting for the channel to reconnect (a
restarted language service is found within `language_reconnect_max_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator

import grpc
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.vision.v1 import vision_pb2

from hero_core.tiling import TilingSpec
from services.common.coalesce import coalesce
from services.common.codec import encode_tensor, layout_message
from services.common.config import secret_value
from services.common.drain import Drain
from services.common.errors import DeadlineError, UpstreamError
from services.common.store import open_store
from services.common.tls import channel_credentials
from services.sdk.errors import ApiError
from services.sdk.language import LanguageClient
from services.vision.cache import CacheHealth, TokenCache
from services.vision.config import VisionConfig
from services.vision.door import (
    Turns,
    check_deadline,
    check_generate,
    check_prune,
    ended_by_deadline,
)
from services.vision.drain import REFUSAL
from services.vision.metrics import VisionMetrics
from services.vision.tokens import EncoderClient, Tokens, TokenSource

log = logging.getLogger("hero.vision")
HEALTH_CACHE_S = 1.0
"""How long a health answer is reused, so probes do not each call the language service."""


def remaining(deadline: float | None) -> float | None:
    """Seconds left before `deadline` (at least 1 ms), None without a deadline."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


def language_status(exc: ApiError, deadline: float | None) -> tuple[grpc.StatusCode, str]:
    """The status to give a client for a failed language call.

    * The client's deadline passed (whatever grpc reported, e.g. a stream cut while the
      tokens were still being sent): DEADLINE_EXCEEDED.
    * A stream that broke while the request was still being written surfaces in grpc as
      INTERNAL "Internal error from Core": the language service went away (or refused
      mid-upload), so it is UNAVAILABLE.
    """
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (
            deadline is not None and time.monotonic() >= deadline):
        return (grpc.StatusCode.DEADLINE_EXCEEDED,
                "the deadline passed before the language service answered")
    if exc.code() == grpc.StatusCode.INTERNAL and "from Core" in (exc.details() or ""):
        return grpc.StatusCode.UNAVAILABLE, "language service: the stream broke; retry"
    return exc.code(), f"language service: {exc.details()}"


def language_client(config: VisionConfig) -> LanguageClient:
    """The client of the language service: TLS when configured, and calls spread over
    every address the target resolves to (`language_lb_policy`)."""
    tls = None
    if config.language_tls_ca_file:
        tls = channel_credentials(config.language_tls_ca_file, config.language_tls_cert_file,
                                  config.language_tls_key_file)
    reconnect_ms = max(1, round(config.language_reconnect_max_s * 1e3))
    return LanguageClient(config.language_target, credentials=tls,
                          options=[("grpc.lb_policy_name", config.language_lb_policy),
                                   ("grpc.initial_reconnect_backoff_ms", reconnect_ms),
                                   ("grpc.max_reconnect_backoff_ms", reconnect_ms)],
                          token=secret_value(config.language_token))


def first_question(turns: Turns) -> str:
    """The question a conversation's tokens are selected for: its first user turn's, the
    turn the image opens. Every later turn of the conversation therefore gets the same
    kept tokens, so its prompt starts with the first turn's prompt (text before the
    image, then the same visual tokens): the prefix the language engine's KV cache
    reuses. A method that does not read the question keeps the same tokens for every
    question about an image anyway."""
    return next((text for role, text in turns if role == "user"), "")


def merge_text_deltas(first: common_pb2.TextDelta | common_pb2.Usage,
                      then: common_pb2.TextDelta | common_pb2.Usage
                      ) -> common_pb2.TextDelta | None:
    """One delta saying what `first` then `then` say; None unless both are deltas."""
    if isinstance(first, common_pb2.TextDelta) and isinstance(then, common_pb2.TextDelta):
        return common_pb2.TextDelta(text=first.text + then.text,
                                    token_ids=[*first.token_ids, *then.token_ids])
    return None


def accepted(tokens: Tokens) -> vision_pb2.Accepted:
    return vision_pb2.Accepted(image_id=tokens.image_id, cache_hit=tokens.cache_hit,
                               tokens_kept=tokens.packed.num_tokens,
                               tokens_total=tokens.packed.full_tokens)


class VisionPipeline:
    """Generate and Prune over the token path and the language service."""

    def __init__(self, config: VisionConfig, tokens: TokenSource, language: LanguageClient,
                 metrics: VisionMetrics):
        self.config, self.tokens, self.language, self.metrics = config, tokens, language, metrics
        self._reachable: tuple[float, bool] = (0.0, False)
        self.drain = Drain(refusal=REFUSAL)
        """Refuses new calls (UNAVAILABLE) once the service drains; a call still streaming
        when the drain's grace ends gets UNAVAILABLE."""

    @classmethod
    def build(cls, config: VisionConfig, encoder: EncoderClient) -> VisionPipeline:
        """A replica's pipeline: the token cache over the configured store (with its
        HMAC key), `encoder` (the encoder deployment, or any `EncoderClient`), the
        language service's client and the service's metrics."""
        metrics, settings = VisionMetrics(), config.cache
        store = open_store(settings.url, settings.timeout_s,
                           password=secret_value(settings.password),
                           tls_ca_file=settings.tls_ca_file)
        cache = TokenCache(store, metrics, settings.ttl_s, settings.max_entry_bytes,
                           lock_ttl_s=settings.lock_ttl_s,
                           secret=(secret_value(settings.secret) or "").encode() or None)
        return cls(config, TokenSource(config, encoder, cache, metrics),
                   language_client(config), metrics)

    async def close(self) -> None:
        """Close the store's and the language service's connections."""
        await self.tokens.cache.store.close()
        await self.language.close()

    async def generate(self, request: vision_pb2.GenerateRequest, *, deadline: float | None,
                       request_id: str) -> AsyncGenerator[vision_pb2.GenerateEvent, None]:
        """`accepted`, the answer's deltas, then `usage`. `deadline`: the client's, on the
        `time.monotonic()` clock; `request_id`: for logs and the language service."""
        arrival = time.perf_counter()
        try:
            with self.drain.admit():
                turns = check_generate(request, self.config)
                check_deadline(deadline)
                question = first_question(turns)
                want = await self.tokens.request(request.image, request.prune, question)
                try:
                    tokens = await self.tokens.cached(want)
                    if tokens is None:
                        await self._validate(request.params, turns, request_id, deadline)
                        tokens = await self.tokens.encoded(want, deadline)
                finally:
                    want.close()
                yield vision_pb2.GenerateEvent(accepted=accepted(tokens))
                async with contextlib.aclosing(self._answer(
                        request, turns, tokens, request_id, arrival, deadline)) as answer:
                    async for event in answer:
                        yield event
        except asyncio.CancelledError as exc:
            if not ended_by_deadline(deadline):
                raise  # the call was cancelled: nobody waits for a status
            raise DeadlineError("the deadline passed before the answer was complete") from exc

    async def prune(self, request: vision_pb2.PruneRequest, *, deadline: float | None,
                    request_id: str) -> AsyncGenerator[vision_pb2.PruneResponse, None]:
        """`accepted`, the tokens' layout and tensor header, then the tensor's chunks."""
        try:
            with self.drain.admit():
                dtype = check_prune(request, self.config)
                check_deadline(deadline)
                tokens = await self.tokens.tokens(request.image, request.prune,
                                                  request.question, deadline=deadline)
                yield vision_pb2.PruneResponse(accepted=accepted(tokens))
                header, chunks = encode_tensor(tokens.packed.features, dtype)
                yield vision_pb2.PruneResponse(tokens=vision_pb2.PrunedTokens(
                    layout=layout_message(tokens.packed), features=header))
                for chunk in chunks:
                    yield vision_pb2.PruneResponse(chunk=chunk)
        except asyncio.CancelledError as exc:
            if not ended_by_deadline(deadline):
                raise
            raise DeadlineError("the deadline passed before the tokens were sent") from exc

    async def selection(self, request: vision_pb2.PruneRequest, *,
                        deadline: float | None) -> Tokens:
        """The tokens a Prune request asks for, checked as Prune checks it, without
        encoding their features for the wire: what a picture of the selection reads."""
        try:
            with self.drain.admit():
                check_prune(request, self.config)
                check_deadline(deadline)
                return await self.tokens.tokens(request.image, request.prune,
                                                request.question, deadline=deadline)
        except asyncio.CancelledError as exc:
            if not ended_by_deadline(deadline):
                raise
            raise DeadlineError("the deadline passed before the tokens were selected") from exc

    async def tiling(self) -> TilingSpec:
        """How the encoder cuts images (the geometry of a layout's tiles)."""
        return (await self.tokens.spec()).tiling

    async def health(self) -> tuple[bool, CacheHealth]:
        """Whether the language service answers, and the token cache's state (a degraded
        cache serves misses: it never makes the service unready)."""
        reachable, cache = await asyncio.gather(
            self.language_reachable(), self.tokens.cache.check(max_age_s=HEALTH_CACHE_S))
        return reachable, cache

    async def language_reachable(self) -> bool:
        """Whether the language service answered GetModelInfo within a second (the answer
        is reused for `HEALTH_CACHE_S`)."""
        checked_at, reachable = self._reachable
        if time.monotonic() - checked_at < HEALTH_CACHE_S:
            return reachable
        try:
            await self.language.model_info(timeout=1.0)
            reachable = True
        except ApiError as exc:
            log.warning("health: language service unreachable: %s", exc.code().name)
            reachable = False
        self._reachable = (time.monotonic(), reachable)
        return reachable

    async def _validate(self, params: common_pb2.GenerationParams, turns: Turns,
                        request_id: str, deadline: float | None) -> None:
        """The language service's verdict on this prompt and these parameters, before an
        image is encoded for them. A language service without `Validate` (older
        version) is not asked; one that is UNAVAILABLE is retried as the answer is."""
        for attempt in range(self.config.language_retries + 1):
            try:
                await self.language.validate(messages=turns, params=params,
                                             request_id=request_id,
                                             timeout=min(5.0, remaining(deadline) or 5.0))
                return
            except ApiError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return
                code, message = language_status(exc, deadline)
                if not await self._retrying(code, message, attempt, deadline):
                    raise UpstreamError(code, message) from exc

    async def _retrying(self, code: grpc.StatusCode, message: str, attempt: int,
                        deadline: float | None) -> bool:
        """Whether a language call that failed with `code` on try `attempt` (from 0) is
        tried again: UNAVAILABLE, with retries left and time for the backoff before the
        deadline. If so, after the backoff it waits for the channel to connect (at most
        twice `language_reconnect_max_s`): a channel that failed to connect fails every
        call at once until its next reconnect attempt."""
        backoff = self.config.language_backoff_s * 2 ** attempt
        if (code != grpc.StatusCode.UNAVAILABLE or attempt >= self.config.language_retries
                or (remaining(deadline) or backoff + 1) <= backoff):
            return False
        log.warning("retry %d of a language call: %s", attempt + 1, message)
        await asyncio.sleep(backoff)
        await self.language.wait_ready(min(2 * self.config.language_reconnect_max_s,
                                           remaining(deadline) or float("inf")))
        return True

    async def _answer(self, request: vision_pb2.GenerateRequest, turns: Turns, tokens: Tokens,
                      request_id: str, arrival: float, deadline: float | None
                      ) -> AsyncGenerator[vision_pb2.GenerateEvent, None]:
        """Stream the answer. A call that fails UNAVAILABLE before its first text is retried
        with backoff (nothing was sent yet, so a retry is safe), but never past the
        client's deadline: the language call ends at that deadline. A call still streaming
        when the drain's grace ends gets UNAVAILABLE."""
        first_ms = 0.0
        for attempt in range(self.config.language_retries + 1):
            timeout = min(self.config.language_timeout_s,
                          remaining(deadline) or self.config.language_timeout_s)
            parts = self.language.generate(
                tokens.packed, messages=turns, params=request.params, request_id=request_id,
                dtype=self.config.cache.dtype, timeout=timeout)
            try:
                # closing `guarded` leaves `parts` suspended when it happens at a yield:
                # `parts` is closed on its own (its close cancels the language call)
                async with contextlib.aclosing(parts), \
                        contextlib.aclosing(self.drain.until_expired(parts)) as guarded, \
                        contextlib.aclosing(self._coalesced(guarded)) as relayed:
                    async for part in relayed:
                        if isinstance(part, common_pb2.Usage):
                            yield self._usage(part, tokens, first_ms)
                        else:
                            first_ms = first_ms or (time.perf_counter() - arrival) * 1e3
                            yield vision_pb2.GenerateEvent(delta=part)
                return
            except ApiError as exc:
                code, message = language_status(exc, deadline)
                if first_ms or not await self._retrying(code, message, attempt, deadline):
                    raise UpstreamError(code, message) from exc

    def _coalesced(self, parts: AsyncGenerator[common_pb2.TextDelta | common_pb2.Usage, None]
                   ) -> AsyncGenerator[common_pb2.TextDelta | common_pb2.Usage, None]:
        """`parts` with the deltas that pile up while the previous event is relayed merged
        into one (`stream_coalesce`, `stream_interval_ms`)."""
        if not self.config.stream_coalesce:
            return parts
        return coalesce(parts, merge_text_deltas, self.config.stream_interval_ms / 1e3)

    def _usage(self, part: common_pb2.Usage, tokens: Tokens,
               first_ms: float) -> vision_pb2.GenerateEvent:
        sent = tokens.packed.features.numel() * tokens.packed.features.element_size()
        self.metrics.sent_bytes.observe(sent)
        self.metrics.stage("ttft", first_ms)
        return vision_pb2.GenerateEvent(usage=vision_pb2.VisionUsage(
            language=part, vision_ms=tokens.vision_ms, queue_ms=tokens.queue_ms,
            ttft_ms=first_ms, bytes_sent=sent))
