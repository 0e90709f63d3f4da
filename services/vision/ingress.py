"""The ingress deployment: the public hero.vision.v1.VisionService behind Serve's gRPC proxy.

A thin adapter: each RPC checks its request, gets the pruned tokens from `TokenSource`
(cache or one encoding), then either returns them (`Prune`) or streams them to the
language service and the answer back (`Generate`). It also answers
`grpc.health.v1.Health/Check` on the public port (see `services.vision.api`), with the
token cache's state in the answer's trailing metadata (`cache_metadata`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.vision.v1 import vision_pb2
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from hero_core.models import crop_embed_dim, encoder_fingerprint, load_tiling, resolve_spec
from services.common.codec import encode_tensor, layout_message
from services.common.config import secret_value
from services.common.drain import Drain
from services.common.errors import (
    DeadlineError,
    NotFoundError,
    OverloadedError,
    UnavailableError,
    UpstreamError,
    public_details,
    status_for,
)
from services.common.params import loggable_request_id, seed_of
from services.common.store import open_store
from services.common.tls import channel_credentials
from services.sdk.language import LanguageClient
from services.vision.api import VISION_SERVICE, MalformedRequest
from services.vision.cache import CacheHealth, TokenCache
from services.vision.config import VisionConfig
from services.vision.door import (
    check_deadline,
    check_generate,
    check_prune,
    deadline_of,
    ended_by_deadline,
    metadata_pairs,
    parsed,
)
from services.vision.drain import REFUSAL, follow
from services.vision.encoder import EncodeJob, EncodeResult
from services.vision.metrics import VisionMetrics
from services.vision.tokens import EncoderClient, Tokens, TokenSource

log = logging.getLogger("hero.vision")
T = TypeVar("T")
HEALTH_CACHE_S = 1.0
"""How long a health answer is reused, so probes do not each call the language service."""


def cache_metadata(health: CacheHealth) -> list[tuple[str, str]]:
    """Trailing metadata of a health answer: `hero-cache` is ok, unknown (not used yet)
    or degraded (requests are served as misses); while degraded, `hero-cache-reason`
    (tls, auth, connection, timeout, error) and `hero-cache-detail` say what failed."""
    if health.up is not False:
        return [("hero-cache", "ok" if health.up else "unknown")]
    detail = health.summary.encode("ascii", "replace").decode()[:200]
    return [("hero-cache", "degraded"), ("hero-cache-reason", health.reason),
            ("hero-cache-detail", detail)]


class ServiceNotFoundError(NotFoundError):
    """A health check for a service this server does not have."""


def remaining(deadline: float | None) -> float | None:
    """Seconds left before `deadline` (at least 1 ms), None without a deadline."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


class RequestFailed(Exception):
    """What an RPC raises once its status is set: code and public details only."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.code, self.details)


def language_status(exc: grpc.aio.AioRpcError, deadline: float | None
                    ) -> tuple[grpc.StatusCode, str]:
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


class RayEncoder:
    """The encoder deployment's handle as a `tokens.EncoderClient`; its failures become
    retryable statuses."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def encode(self, job: EncodeJob) -> EncodeResult:
        """One image's encoding, called outside the Serve request that started it: every
        request waiting for this image shares it, and Ray cancels a request's calls to
        other deployments when that request is cancelled, which would fail the others."""
        async def call() -> Any:  # runs, and makes the call, in an empty context
            return await self._call(self.handle.encode.remote(job))

        result = await asyncio.get_running_loop().create_task(call(),
                                                              context=contextvars.Context())
        if isinstance(result, Exception):  # this image's own failure, from its batch
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


def language_client(config: VisionConfig) -> LanguageClient:
    """The client of the language service: TLS when configured, and calls spread over
    every address the target resolves to (`language_lb_policy`)."""
    tls = None
    if config.language_tls_ca_file:
        tls = channel_credentials(config.language_tls_ca_file, config.language_tls_cert_file,
                                  config.language_tls_key_file)
    return LanguageClient(config.language_target, credentials=tls,
                          options=[("grpc.lb_policy_name", config.language_lb_policy)],
                          token=secret_value(config.language_token))


class VisionIngress:
    """The public RPCs over `TokenSource` and the language client; no model weights."""

    def __init__(self, encoder: DeploymentHandle[Any] | EncoderClient, config: dict[str, Any]):
        """`encoder`: the encoder deployment's handle (or, in tests, any `EncoderClient`)."""
        from transformers import AutoConfig

        self.config = VisionConfig.load(values=config)
        self.auth = self.config.bearer_tokens()  # none: refuses to start, unless allowed
        self.config.require_cache_secret()
        spec = resolve_spec(self.config.model, self.config.models_dir, self.config.device,
                            self.config.dtype)
        model_config = AutoConfig.from_pretrained(spec.model,
                                                  local_files_only=spec.local_files_only)
        tiling = load_tiling(spec, int(model_config.vision_config.patch_size))
        self.metrics = VisionMetrics()
        cache = self.config.cache
        store = open_store(cache.url, cache.timeout_s, password=secret_value(cache.password),
                           tls_ca_file=cache.tls_ca_file)
        secret = (secret_value(cache.secret) or "").encode() or None
        self.cache = TokenCache(store, self.metrics, cache.ttl_s, cache.max_entry_bytes,
                                lock_ttl_s=cache.lock_ttl_s, secret=secret)
        self.cache_checked = _in_running_loop(self.cache.check())
        """The startup check of the cache (a failure is logged at ERROR and the service
        serves misses); None when constructed outside an event loop."""
        width = int(model_config.vision_config.hidden_size)
        self.source = TokenSource(
            self.config, RayEncoder(encoder) if isinstance(encoder, DeploymentHandle)
            else encoder, self.cache, tiling,
            encoder_fingerprint(spec, model_config.vision_feature_layer, tiling),
            width, self.metrics, crop_embed_dim(spec, width))
        self.language = language_client(self.config)
        self._health: tuple[float, bool] = (0.0, False)
        self.drain = Drain(refusal=REFUSAL)
        self._drain_follower = follow(self.drain)  # the runner's drain, where it has one

    def _admit(self, grpc_context: Any) -> float | None:
        """Require `authorization: Bearer <token>` when tokens are configured, then read
        the metadata the service uses: the client's deadline (`time.monotonic()`)."""
        metadata = metadata_pairs(grpc_context)
        self.auth.check(metadata)
        return deadline_of(metadata)

    # ---- RPCs -------------------------------------------------------------------------

    async def Generate(self, request: vision_pb2.GenerateRequest | MalformedRequest,
                       grpc_context: Any = None) -> AsyncIterator[vision_pb2.GenerateEvent]:
        arrival, deadline = time.perf_counter(), None
        request_id = loggable_request_id(getattr(request, "request_id", ""))
        try:
            with self.drain.admit():  # refused (UNAVAILABLE) once the service drains
                deadline = self._admit(grpc_context)
                request = parsed(request)
                turns = check_generate(request, self.config)
                check_deadline(deadline)
                question = next((t for r, t in reversed(turns) if r == "user"), "")

                async def check() -> None:  # before this request encodes a miss
                    await self._validate(request, turns, request_id, deadline)

                tokens = await self.source.tokens(request.image, request.prune, question,
                                                  check=check, deadline=deadline)
                yield vision_pb2.GenerateEvent(accepted=self._accepted(tokens))
                async for event in self._answer(request, request_id, turns, tokens, arrival,
                                                deadline):
                    yield event
            self.metrics.requests.inc(1, tags={"rpc": "Generate", "code": "OK"})
        except asyncio.CancelledError as exc:
            if not ended_by_deadline(deadline):
                raise  # the call was cancelled: nobody waits for a status
            raise self._fail(DeadlineError("the deadline passed before the answer was "
                                           "complete"), request_id, "Generate",
                             grpc_context) from exc
        except Exception as exc:
            raise self._fail(exc, request_id, "Generate", grpc_context) from exc

    async def Prune(self, request: vision_pb2.PruneRequest | MalformedRequest,
                    grpc_context: Any = None) -> AsyncIterator[vision_pb2.PruneResponse]:
        deadline = None
        request_id = loggable_request_id(getattr(request, "request_id", ""))
        try:
            with self.drain.admit():  # refused (UNAVAILABLE) once the service drains
                deadline = self._admit(grpc_context)
                request = parsed(request)
                dtype = check_prune(request, self.config)
                check_deadline(deadline)
                tokens = await self.source.tokens(request.image, request.prune, request.question,
                                                  deadline=deadline)
                yield vision_pb2.PruneResponse(accepted=self._accepted(tokens))
                header, chunks = encode_tensor(tokens.packed.features, dtype)
                yield vision_pb2.PruneResponse(tokens=vision_pb2.PrunedTokens(
                    layout=layout_message(tokens.packed), features=header))
                for chunk in chunks:
                    yield vision_pb2.PruneResponse(chunk=chunk)
            self.metrics.requests.inc(1, tags={"rpc": "Prune", "code": "OK"})
        except asyncio.CancelledError as exc:
            if not ended_by_deadline(deadline):
                raise
            raise self._fail(DeadlineError("the deadline passed before the tokens were "
                                           "sent"), request_id, "Prune", grpc_context) from exc
        except Exception as exc:
            raise self._fail(exc, request_id, "Prune", grpc_context) from exc

    async def Check(self, request: health_pb2.HealthCheckRequest | MalformedRequest,
                    grpc_context: Any = None) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING while the language service answers and the service is
        not draining, else NOT_SERVING. The service name is "" (the whole server) or
        hero.vision.v1.VisionService. The token cache's state rides in the trailing
        metadata (`cache_metadata`): a degraded cache is reported, never NOT_SERVING,
        since misses still serve."""
        try:
            request = parsed(request)
            if request.service not in ("", VISION_SERVICE):
                raise ServiceNotFoundError(f"unknown service {request.service[:100]!r}; ask "
                                           f"for '' or {VISION_SERVICE}")
            serving, cache = await asyncio.gather(self.language_reachable(),
                                                  self.cache.check(max_age_s=HEALTH_CACHE_S))
            if grpc_context is not None:
                grpc_context.set_trailing_metadata(cache_metadata(cache))
        except Exception as exc:
            raise self._fail(exc, "health", "Check", grpc_context) from exc
        serving = serving and not self.drain.draining
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING
                                              if serving else
                                              health_pb2.HealthCheckResponse.NOT_SERVING)

    async def check_health(self) -> None:
        """Ray Serve's periodic replica check. It asks the token cache whether it answers,
        so its gauge and log follow Redis without traffic, and never fails for it: a
        cache outage is a miss, not a reason to restart the replica."""
        try:
            await self.cache.check(max_age_s=HEALTH_CACHE_S)
        except Exception:
            log.exception("token cache check failed")

    async def language_reachable(self) -> bool:
        """Whether the language service answered GetModelInfo within a second (the answer
        is reused for `HEALTH_CACHE_S`)."""
        checked_at, reachable = self._health
        if time.monotonic() - checked_at < HEALTH_CACHE_S:
            return reachable
        try:
            await self.language.model_info(timeout=1.0)
            reachable = True
        except grpc.aio.AioRpcError as exc:
            log.warning("health: language service unreachable: %s", exc.code().name)
            reachable = False
        self._health = (time.monotonic(), reachable)
        return reachable

    def _fail(self, exc: BaseException, request_id: str, rpc: str,
              grpc_context: Any) -> RequestFailed:
        """Count the failure, set its status on the call, and return what to raise: a plain
        `RequestFailed` (Ray pickles it to the proxy; the status set here is what the
        client gets)."""
        code, message = status_for(exc, request_id)
        self.metrics.requests.inc(1, tags={"rpc": rpc, "code": code.name})
        details = public_details(message)
        if grpc_context is not None:
            grpc_context.set_code(code)
            grpc_context.set_details(details)
        return RequestFailed(code, details)

    @staticmethod
    def _accepted(tokens: Tokens) -> vision_pb2.Accepted:
        return vision_pb2.Accepted(image_id=tokens.image_id, cache_hit=tokens.cache_hit,
                                   tokens_kept=tokens.packed.num_tokens,
                                   tokens_total=tokens.packed.full_tokens)

    async def _validate(self, request: vision_pb2.GenerateRequest,
                        turns: tuple[tuple[str, str], ...], request_id: str,
                        deadline: float | None) -> None:
        """The language service's verdict on this prompt and these parameters, before an
        image is encoded for them. A language service without `Validate` (older
        version) is not asked."""
        params = request.params
        timeout = min(5.0, remaining(deadline) or 5.0)
        try:
            await self.language.validate(
                messages=turns, max_new_tokens=params.max_new_tokens,
                temperature=params.temperature, top_p=params.top_p, seed=seed_of(params),
                stop=list(params.stop), ignore_eos=params.ignore_eos, request_id=request_id,
                timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise UpstreamError(*language_status(exc, deadline)) from exc

    async def _answer(self, request: vision_pb2.GenerateRequest, request_id: str,
                      turns: tuple[tuple[str, str], ...], tokens: Tokens, arrival: float,
                      deadline: float | None) -> AsyncIterator[vision_pb2.GenerateEvent]:
        """Stream the answer. A call that fails UNAVAILABLE before its first text is retried
        with backoff (nothing was sent yet, so a retry is safe), but never past the
        client's deadline: the language call ends at that deadline. A call still streaming
        when the drain's grace ends gets UNAVAILABLE."""
        params, first_ms = request.params, 0.0
        for attempt in range(self.config.language_retries + 1):
            timeout = min(self.config.language_timeout_s,
                          remaining(deadline) or self.config.language_timeout_s)
            parts = self.language.generate(
                tokens.packed, messages=turns, max_new_tokens=params.max_new_tokens,
                temperature=params.temperature, top_p=params.top_p, seed=seed_of(params),
                stop=list(params.stop), ignore_eos=params.ignore_eos, request_id=request_id,
                dtype=self.config.cache.dtype, timeout=timeout)
            try:
                async with contextlib.aclosing(self.drain.until_expired(parts)) as guarded:
                    async for part in guarded:
                        if isinstance(part, common_pb2.Usage):
                            yield self._usage(part, tokens, first_ms)
                        else:
                            if not first_ms:
                                first_ms = (time.perf_counter() - arrival) * 1e3
                            yield vision_pb2.GenerateEvent(delta=part)
                return
            except grpc.aio.AioRpcError as exc:
                code, message = language_status(exc, deadline)
                backoff = self.config.language_backoff_s * 2 ** attempt
                retry = (not first_ms and code == grpc.StatusCode.UNAVAILABLE
                         and attempt < self.config.language_retries
                         and (remaining(deadline) or backoff + 1) > backoff)
                if not retry:
                    raise UpstreamError(code, message) from exc
                log.warning("language service unavailable, retry %d: %s", attempt + 1,
                            exc.details())
                await asyncio.sleep(backoff)

    def _usage(self, part: common_pb2.Usage, tokens: Tokens,
               first_ms: float) -> vision_pb2.GenerateEvent:
        sent = tokens.packed.features.numel() * tokens.packed.features.element_size()
        self.metrics.sent_bytes.observe(sent)
        self.metrics.stage("ttft", first_ms)
        return vision_pb2.GenerateEvent(usage=vision_pb2.VisionUsage(
            language=part, vision_ms=tokens.vision_ms, queue_ms=tokens.queue_ms,
            ttft_ms=first_ms, bytes_sent=sent))


def _in_running_loop(work: Coroutine[Any, Any, T]) -> asyncio.Task[T] | None:
    """`work` as a task of the running event loop (Ray Serve constructs a replica's
    deployment object in it), or None, and `work` discarded, outside one."""
    try:
        return asyncio.get_running_loop().create_task(work)
    except RuntimeError:
        work.close()
        return None
