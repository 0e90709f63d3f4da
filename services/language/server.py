"""The language service: a thin grpc.aio adapter around an `Engine` (which engine is
chosen where the service is assembled: `services/language/app.py`).

A `Generate` stream is read as header, visual tokens, chunks; everything is checked
against the loaded model before a slot is taken; text streams back as it is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.language.v1 import language_pb2, language_pb2_grpc

from hero_core.errors import InvalidInputError
from services.common.coalesce import coalesce
from services.common.codec import (
    DTYPE_NAMES,
    ChunkAssembler,
    check_tensor_header,
    packed_from_layout,
)
from services.common.drain import Drain
from services.common.errors import DeadlineError, UnavailableError, status_for
from services.common.metrics import serve_metrics
from services.common.params import (
    check_generation_params,
    loggable_request_id,
    request_id_of,
    seed_of,
    turns_of,
)
from services.common.tls import server_credentials
from services.language.admission import Admission
from services.language.config import LanguageConfig, LimitsConfig
from services.language.engine import (
    Delta,
    Engine,
    EngineRequest,
    EngineStats,
    Finished,
    SamplingParams,
)
from services.language.metrics import LanguageMetrics
from services.language.model import smallest_packed

log = logging.getLogger("hero.language")
SERVICE = language_pb2.DESCRIPTOR.services_by_name["LanguageService"].full_name
FINISH = {"eos": common_pb2.FINISH_REASON_EOS, "length": common_pb2.FINISH_REASON_LENGTH,
          "stop": common_pb2.FINISH_REASON_STOP,
          "cancelled": common_pb2.FINISH_REASON_UNSPECIFIED}
CLOSE_S = 5.0
"""After the drain: how long the last refused or ended calls get to receive their status
before the server closes its port."""


def check_params(params: common_pb2.GenerationParams, limits: LimitsConfig) -> SamplingParams:
    """Sampling parameters from the wire, or `InvalidInputError` naming the bad one."""
    check_generation_params(params, limits.max_new_tokens, limits.max_stop_strings,
                            limits.max_stop_chars)
    return SamplingParams(params.max_new_tokens, float(params.temperature),
                          float(params.top_p) or 1.0, seed_of(params), tuple(params.stop),
                          bool(params.ignore_eos))


def messages_of(header: language_pb2.GenerateHeader,
                limits: LimitsConfig) -> tuple[tuple[str, str], ...]:
    """(role, text) turns of the header's prompt or chat."""
    which = header.WhichOneof("input")
    return turns_of(header.prompt if which == "prompt" else None,
                    list(header.chat.messages) if which == "chat" else None,
                    limits.max_prompt_chars, limits.max_messages)


def merge_deltas(first: Delta | Finished, then: Delta | Finished) -> Delta | None:
    """One delta saying what `first` then `then` say; None unless both are deltas."""
    if isinstance(first, Delta) and isinstance(then, Delta):
        return Delta(first.text + then.text, [*first.token_ids, *then.token_ids])
    return None


async def _drain(stream: AsyncIterator[language_pb2.GenerateRequest],
                 timeout_s: float = 5.0) -> None:
    """Read and drop what the client is still sending before refusing its call: a client
    whose request stream is cut mid-write sees a broken stream (INTERNAL) instead of the
    status it should get (RESOURCE_EXHAUSTED, INVALID_ARGUMENT, ...)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout_s):
            async for _ in stream:
                pass


async def _next(stream: AsyncIterator[language_pb2.GenerateRequest], want: str) -> Any:
    try:
        message = await anext(stream)
    except StopAsyncIteration:
        raise InvalidInputError(f"the stream ended before the {want} message") from None
    if message.WhichOneof("part") != want:
        raise InvalidInputError(f"expected a {want} message, got "
                                f"{message.WhichOneof('part') or 'an empty message'}")
    return getattr(message, want)


class LanguageServicer(language_pb2_grpc.LanguageServiceServicer):
    """Implements hero.language.v1.LanguageService over an engine."""

    def __init__(self, config: LanguageConfig, metrics: LanguageMetrics):
        self.config = config
        self.limits = config.limits
        self.metrics = metrics
        self.engine: Engine | None = None
        self.admission = Admission(config.max_queue, self._occupancy, self._describe)
        self.accepted = frozenset(DTYPE_NAMES[d] for d in config.accepted_dtypes)
        self.auth = config.bearer_tokens()  # none: refuses to start, unless allowed
        self.drain = Drain(refusal="the language service is shutting down (draining); "
                                   "retry, another replica will take the call")

    async def GetModelInfo(self, request: language_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> language_pb2.ModelInfo:
        try:
            self._authorize(context)
            engine = self._engine()
        except Exception as exc:
            await context.abort(*status_for(exc, "model-info"))
        return language_pb2.ModelInfo(
            model=engine.info.model, feature_dim=engine.info.feature_dim,
            tokens_per_side=engine.info.tiling.side, accepted_dtypes=sorted(self.accepted),
            max_new_tokens_limit=self.limits.max_new_tokens,
            max_prompt_tokens=self.limits.max_prompt_tokens)

    async def Validate(self, header: language_pb2.GenerateHeader,
                       context: grpc.aio.ServicerContext) -> language_pb2.ValidateResponse:
        """Generate's checks of the prompt and parameters, on the smallest image layout."""
        request_id = loggable_request_id(header.request_id)
        try:
            self._authorize(context)
            request_id_of(header.request_id)
            engine = self._engine()
            packed = smallest_packed(engine.info.tiling, engine.info.feature_dim)
            engine.check(EngineRequest(request_id, packed, messages_of(header, self.limits),
                                       check_params(header.params, self.limits)),
                         self.limits.max_prompt_tokens)
        except Exception as exc:
            code, message = status_for(exc, request_id)
            await context.abort(code, message)
        return language_pb2.ValidateResponse()

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        self.auth.check(tuple(context.invocation_metadata() or ()))

    def _occupancy(self) -> EngineStats:
        return EngineStats(0, 0, 0) if self.engine is None else self.engine.stats()

    def _describe(self) -> str:
        if self.engine is None:
            return ""
        stats = self.engine.stats()
        kv = (f", {stats.kv_tokens_reserved} of {stats.kv_tokens_capacity} KV tokens reserved"
              if stats.kv_tokens_capacity else "")
        return f"; {stats.running} running{kv}"

    def _engine(self) -> Engine:
        if self.engine is None:
            raise UnavailableError("the model is still loading; retry shortly")
        return self.engine

    async def Generate(self, request_iterator: AsyncIterator[language_pb2.GenerateRequest],
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[language_pb2.GenerateResponse]:
        arrival, request_id, code = time.perf_counter(), "-", grpc.StatusCode.OK
        counted = False
        try:
            with self.drain.admit():  # refused (UNAVAILABLE) once the server drains
                self._authorize(context)
                header = await _next(request_iterator, "header")
                request_id = loggable_request_id(header.request_id)
                ticket = self.admission.reserve()  # refuse at once when full
                try:
                    request = await self._read_request(header, request_id, request_iterator)
                    self.metrics.visual_tokens.observe(request.packed.num_tokens)
                    remaining = context.time_remaining()
                    deadline = None if remaining is None else time.monotonic() + remaining
                    async for response in self._stream(request, arrival, deadline):
                        yield response
                finally:
                    ticket.release()
        except (asyncio.CancelledError, GeneratorExit):
            # a cancelled call: its task cancelled, or its response stream closed by grpc
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # every failure leaves as one status, mapped in one place
            code, message = status_for(exc, request_id)
            await _drain(request_iterator)
            # counted before the status leaves: a client that sees it, sees it counted
            self.metrics.finish(code.name)
            counted = True
            await context.abort(code, message)
        finally:
            if not counted:
                self.metrics.finish(code.name)

    async def _read_request(self, header: language_pb2.GenerateHeader, request_id: str,
                            stream: AsyncIterator[language_pb2.GenerateRequest]
                            ) -> EngineRequest:
        engine = self._engine()
        request_id_of(header.request_id)
        params = check_params(header.params, self.limits)
        turns = messages_of(header, self.limits)
        tokens = await _next(stream, "tokens")
        check_tensor_header(tokens.features, engine.info.feature_dim, self.accepted,
                            self.limits.max_visual_tokens)
        assembler = ChunkAssembler(tokens.features)
        while not assembler.complete:
            assembler.add(await _next(stream, "chunk"))
        packed = packed_from_layout(tokens.layout, assembler.tensor())
        return engine.check(EngineRequest(request_id, packed, turns, params),
                            self.limits.max_prompt_tokens)

    async def _stream(self, request: EngineRequest, arrival: float,
                      deadline: float | None) -> AsyncIterator[language_pb2.GenerateResponse]:
        """Engine events as responses; the deadline is checked on every event (grpc does
        not always cancel a handler whose deadline passed while it was streaming) and
        the engine ends a request whose deadline passes while it waits or runs. Once the
        drain's grace is over the call ends with UNAVAILABLE instead of its next event."""
        self.metrics.in_flight.inc()
        try:
            # closed as soon as the call ends, however it ends, so the engine lets go at once
            stream = cast(AsyncGenerator[Delta | Finished, None],
                          self._engine().stream(request, deadline))  # engines are generators
            async with contextlib.aclosing(stream) as engine_events, \
                    contextlib.aclosing(self.drain.until_expired(engine_events)) as guarded, \
                    contextlib.aclosing(self._coalesced(guarded)) as events:
                async for event in events:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise DeadlineError("the call's deadline passed; generation stopped")
                    if isinstance(event, Delta):
                        yield language_pb2.GenerateResponse(delta=common_pb2.TextDelta(
                            text=event.text, token_ids=event.token_ids))
                    else:
                        yield language_pb2.GenerateResponse(usage=self._usage(event, arrival))
        finally:
            self.metrics.in_flight.dec()

    def _coalesced(self, events: AsyncGenerator[Delta | Finished, None]
                   ) -> AsyncGenerator[Delta | Finished, None]:
        """`events` with the deltas that pile up while a response is being written merged
        into one (`stream_coalesce`, `stream_interval_ms`)."""
        if not self.config.stream_coalesce:
            return events
        return coalesce(events, merge_deltas, self.config.stream_interval_ms / 1e3)

    def _usage(self, done: Finished, arrival: float) -> common_pb2.Usage:
        ttft_ms = (done.first_token_at - arrival) * 1e3 if done.first_token_at else 0.0
        self.metrics.observe_generation(ttft_ms, done.prefill_ms, done.decode_tokens_per_s,
                                        done.completion_tokens)
        return common_pb2.Usage(
            prompt_tokens=done.prompt_tokens, visual_tokens=done.visual_tokens,
            completion_tokens=done.completion_tokens, prefill_ms=done.prefill_ms,
            ttft_ms=ttft_ms, decode_tokens_per_s=done.decode_tokens_per_s, queue_ms=done.queue_ms,
            finish_reason=FINISH[done.finish_reason])


@dataclasses.dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    servicer: LanguageServicer
    health: Any
    metrics_port: int | None

    async def stop(self, grace_s: float) -> None:
        """Drain, then stop: report NOT_SERVING and refuse new calls (UNAVAILABLE), let the
        running ones finish within `grace_s`, end the rest with UNAVAILABLE, close the
        port, and shut the engine down."""
        drain = self.servicer.drain
        drain.begin()
        await self.health.enter_graceful_shutdown()
        if not await drain.wait_idle(grace_s):
            log.warning("%d calls still running after the %g s drain: ending them "
                        "(UNAVAILABLE, retryable)", drain.in_flight, grace_s)
            drain.expire(f"the language service is shutting down: this call ran past its "
                         f"{grace_s:g} s drain (shutdown_grace_s); retry")
            await drain.wait_idle(CLOSE_S)
        # every call has its status by now; grpc cancels what is left after CLOSE_S
        await self.server.stop(CLOSE_S)
        if self.servicer.engine is not None:
            await asyncio.to_thread(self.servicer.engine.shutdown)


async def start_server(config: LanguageConfig,
                       load_engine: Callable[[], Engine]) -> RunningServer:
    """Bind, report NOT_SERVING, load and warm the engine in a thread, then SERVING."""
    metrics = LanguageMetrics()
    servicer = LanguageServicer(config, metrics)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", config.limits.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * 1000))])
    language_pb2_grpc.add_LanguageServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if config.reflection:
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME,
                                             reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert_file is not None and config.tls_key_file is not None:
        port = server.add_secure_port(address, server_credentials(
            config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file))
    else:
        port = server.add_insecure_port(address)
    await server.start()
    metrics_port = serve_metrics(metrics.registry, config.metrics_host, config.metrics_port)

    def load() -> Engine:
        engine = load_engine()
        engine.observer = metrics
        if config.warmup:
            engine.warmup()
        return engine

    servicer.engine = await asyncio.to_thread(load)
    metrics.watch(servicer.engine.stats)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("language service SERVING on %s:%d (model %s)", config.host, port, config.model)
    return RunningServer(server, port, servicer, health_servicer, metrics_port)
