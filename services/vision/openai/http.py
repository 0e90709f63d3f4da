"""The OpenAI-compatible HTTP API over the vision pipeline, as Serve's HTTP proxy calls it.

    POST /v1/chat/completions     an image and a conversation in, an answer out
    GET  /v1/models               the served model, with HERO's methods and defaults
    GET  /v1/models/{id}
    POST /v1/hero/layout          where a selection's kept tokens sit (`layout.py`)
    GET  /                        the playground page, and its files under /playground/

The page and its files are served to anyone (they hold nothing secret). Every other
route takes the gRPC API's bearer tokens (`Authorization: Bearer <token>`),
checked before anything else is read; then the `hero-timeout-ms` header, when sent, as
the call's deadline (as on gRPC); then the body, refused before any of it is parsed
without a Content-Length (411) or when that length, or the bytes that have arrived,
pass `max_http_body_bytes` (413). The request then goes through the same pipeline as gRPC's
Generate (`VisionPipeline.generate`: limits, cache, pruning, the language call), so
answers and failures are the same; `errors.py` maps the failures to HTTP.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol

from hero.vision.v1 import vision_pb2
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from hero_core.methods import METHODS
from services.common.auth import BearerTokens
from services.common.params import TIMEOUT_HEADER
from services.vision.config import VisionConfig
from services.vision.door import deadline_of
from services.vision.metrics import VisionMetrics
from services.vision.openai.convert import check_model, generate_request
from services.vision.openai.errors import HttpError, body_too_large, error_response
from services.vision.openai.layout import selection_layout
from services.vision.openai.responses import Answer, collect, response_headers, stream
from services.vision.openai.schema import parse_layout_request, parse_request
from services.vision.pipeline import VisionPipeline
from services.vision.playground import HEADERS as PAGE_HEADERS
from services.vision.playground import assets

CHAT = "/v1/chat/completions"
MODELS = "/v1/models"
LAYOUT = "/v1/hero/layout"
_LENGTH = re.compile(r"[0-9]{1,19}")
Metadata = list[tuple[str, Any]]


class Door(Protocol):
    """What the API needs of the vision ingress it is part of."""

    config: VisionConfig
    auth: BearerTokens
    metrics: VisionMetrics
    pipeline: VisionPipeline


def header_metadata(request: Request) -> Metadata:
    """The headers the pipeline reads, as call metadata pairs (repeats kept)."""
    return [(key, value) for key, value in request.headers.items()
            if key in ("authorization", TIMEOUT_HEADER)]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused before any of it is parsed: 411 without a Content-Length, 413
    when that length passes `limit` or, should more bytes arrive than it said (a front
    end that changed the framing), as soon as `limit` bytes have arrived.

    Serve's HTTP proxy reads a body ahead of the replica, with no backpressure, so a body
    of unknown length (chunked) would be held in memory up to the size the client sends
    in the time the replica needs to count to `limit`; hence the length is required
    (every OpenAI client sends it). A request whose body was read whole is marked
    (`request.state.read`)."""
    length = request.headers.get("content-length")
    if length is None:
        raise HttpError(411, "length_required", "send the body with a Content-Length "
                        f"header (at most {limit} bytes); a body of unknown length is "
                        "not read")
    if not _LENGTH.fullmatch(length):
        raise HttpError(400, "invalid_content_length",
                        "Content-Length must be a decimal number of bytes")
    if int(length) > limit:
        raise body_too_large(limit, int(length))
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise body_too_large(limit)
    except ClientDisconnect:
        raise HttpError(400, "client_disconnected", "the client went away before the "
                        "body was complete") from None
    request.state.read = True  # an error answer from here on may keep the connection
    return bytes(body)


class Started:
    """`events` whose next event has already arrived (`await Started.of(events)`: its
    failure raised there, not later); closing this closes `events`."""

    def __init__(self, first: vision_pb2.GenerateEvent | None,
                 events: AsyncGenerator[vision_pb2.GenerateEvent, None]):
        self.first, self.events = first, events

    @classmethod
    async def of(cls, events: AsyncGenerator[vision_pb2.GenerateEvent, None]) -> Started:
        return cls(await anext(events, None), events)

    def __aiter__(self) -> Started:
        return self

    async def __anext__(self) -> vision_pb2.GenerateEvent:
        if self.first is not None:
            first, self.first = self.first, None
            return first
        return await anext(self.events)

    async def aclose(self) -> None:
        await self.events.aclose()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body iterator however the response ends.

    Starlette leaves the iterator suspended when the response is cancelled (Serve
    cancels it when the client disconnects) while the response awaits `send` rather than
    the iterator; a suspended generator is closed only when it is garbage collected, so
    the language call behind it would go on decoding for an absent client until then."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


class OpenAIApi:
    """The routes above, over the pipeline of the ingress deployment it is part of."""

    def __init__(self, door: Door):
        self.door, self.pipeline = door, door.pipeline
        self.config = door.config
        self.served = self.config.openai.served_model_name or self.config.model
        self.created = int(time.time())
        self.routes: dict[tuple[str, str], Callable[..., Awaitable[Response]]] = {
            ("POST", CHAT): self.chat, ("GET", MODELS): self.models,
            ("POST", LAYOUT): self.layout}
        self.assets = assets()

    async def __call__(self, request: Request) -> Response:
        request_id = uuid.uuid4().hex
        asset = self.assets.get(request.url.path)
        if asset is not None and request.method == "GET":
            content, media_type = asset
            return Response(content, media_type=media_type, headers=PAGE_HEADERS)
        try:
            handler = self._route(request)
            metadata = header_metadata(request)
            self.door.auth.check(metadata)
            return await handler(request, metadata, request_id)
        except Exception as exc:
            # a body left unread (a refusal before it was read) is not read on: the
            # connection ends with the answer
            unread = request.method == "POST" and not getattr(request.state, "read", False)
            response, code = error_response(exc, request_id,
                                            {"connection": "close"} if unread else None)
            if request.url.path.rstrip("/") == CHAT:
                self._count(code)
            return response

    def _route(self, request: Request) -> Callable[..., Awaitable[Response]]:
        path = request.url.path.rstrip("/")
        if path.startswith(MODELS + "/") and request.method == "GET":
            return self.model
        handler = self.routes.get((request.method, path))
        if handler is not None:
            return handler
        if any(p == path for _, p in self.routes):
            raise HttpError(405, "method_not_allowed",
                            f"{request.method} is not allowed on {path}")
        raise HttpError(404, "unknown_url", f"no route {request.method} {path[:200]}; "
                        f"this server answers POST {CHAT}, GET {MODELS}, POST {LAYOUT} "
                        "and the playground page at /")

    def _count(self, code: str) -> None:
        self.door.metrics.requests.inc(1, tags={"rpc": "ChatCompletions", "code": code})

    async def chat(self, request: Request, metadata: Metadata, request_id: str) -> Response:
        deadline = deadline_of(metadata)
        data = await read_body(request, self.config.max_http_body_bytes)
        body = parse_request(data)
        check_model(body, self.served)
        generate = await generate_request(body, self.config, request_id)
        events = self.pipeline.generate(generate, deadline=deadline, request_id=request_id)
        try:
            first = await anext(events)
            if first.WhichOneof("event") != "accepted":
                raise RuntimeError(f"the pipeline began with {first.WhichOneof('event')}")
            answer = Answer(request_id, self.served, first.accepted)
            headers = response_headers(first.accepted)
            if body.stream:
                # the status line waits for the first text (or the end), so that what fails
                # before it (the language service's overload, its checks) has its own status
                sse = stream(answer, await Started.of(events), body.include_usage(),
                             self._count)
                return ClosingStreamingResponse(sse, media_type="text/event-stream",
                                                headers={**headers,
                                                         "cache-control": "no-cache"})
        except BaseException:
            await events.aclose()
            raise
        text, usage = await collect(events)
        self._count("OK")
        return JSONResponse(answer.completion(text, usage), headers=headers)

    async def layout(self, request: Request, metadata: Metadata, request_id: str) -> Response:
        deadline = deadline_of(metadata)
        data = await read_body(request, self.config.max_http_body_bytes)
        body = parse_layout_request(data)
        tiling = await self.pipeline.tiling()
        return JSONResponse(await selection_layout(self.pipeline, tiling, body, self.config,
                                                   deadline, request_id))

    def model_card(self) -> dict[str, Any]:
        return {"id": self.served, "object": "model", "created": self.created,
                "owned_by": "hero-serve",
                "hero": {"methods": sorted(METHODS),
                         "default_method": self.config.default_method,
                         "default_retention": self.config.default_retention,
                         "max_image_bytes": self.config.max_image_bytes,
                         "image_url_schemes": ["data", "hero-image",
                                               *(["http", "https"]
                                                 if self.config.openai.image_url_hosts
                                                 else [])]}}

    async def models(self, request: Request, metadata: Metadata, request_id: str) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request, metadata: Metadata, request_id: str) -> Response:
        name = request.url.path.rstrip("/")[len(MODELS) + 1:]
        if name != self.served:
            raise HttpError(404, "model_not_found", f"the model {name[:100]!r} is not served "
                            f"here; this deployment serves {self.served!r}")
        return JSONResponse(self.model_card())
