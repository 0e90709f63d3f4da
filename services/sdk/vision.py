"""Python clients of hero.vision.v1.VisionService (the public API).

    with VisionClient() as client:   # HERO_TARGET (default 127.0.0.1:9000), HERO_API_TOKEN
        for event in client.generate("photo.jpg", "What is on the sign?", max_new_tokens=64):
            ...

`AsyncVisionClient` is the asyncio twin. Images go as bytes the first time; the
`accepted.image_id` the service returns can be sent instead afterwards. Failures raise
the typed errors of `services.sdk.errors` (`InvalidRequest`, `Overloaded`, ...), which
are `grpc.RpcError`s too.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, Unpack

import grpc
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.vision.v1 import vision_pb2, vision_pb2_grpc

from hero_core.packing import PackedTokens
from services.common.auth import bearer_metadata
from services.common.codec import DTYPE_NAMES, ChunkAssembler, packed_from_layout
from services.common.params import MAX_TIMEOUT_MS, TIMEOUT_HEADER
from services.sdk.channel import AsyncChannelClient
from services.sdk.errors import api_error

DEFAULT_TARGET = "127.0.0.1:9000"
TARGET_ENV, TOKEN_ENV = "HERO_TARGET", "HERO_API_TOKEN"

ImageLike = bytes | str | Path


class PruneOptions(TypedDict, total=False):
    """How to prune: the method and retention (0 = the service's defaults), or an image
    id the service returned instead of the image."""

    image_id: str | None
    method: str
    retention: float
    request_id: str


class GenerateOptions(PruneOptions, total=False):
    """`PruneOptions` plus the conversation and sampling settings of a Generate call."""

    messages: Sequence[tuple[str, str]] | None
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: Sequence[str]
    ignore_eos: bool


def connection(target: str | None, token: str | None) -> tuple[str, str | None]:
    """The target and token to use: given ones, else $HERO_TARGET / $HERO_API_TOKEN (pass
    token="" for none)."""
    return (target or os.environ.get(TARGET_ENV, DEFAULT_TARGET),
            os.environ.get(TOKEN_ENV) if token is None else token or None)


def image_input(image: ImageLike | None = None, image_id: str | None = None
                ) -> vision_pb2.ImageInput:
    """An ImageInput from file bytes, a file path, or an id the service returned."""
    if image_id:
        return vision_pb2.ImageInput(image_id=image_id)
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    if not image:
        raise ValueError("give image bytes, an image path, or an image_id")
    return vision_pb2.ImageInput(data=image)


def generate_request(image: ImageLike | None, prompt: str | None, *,
                     messages: Sequence[tuple[str, str]] | None = None,
                     image_id: str | None = None, method: str = "", retention: float = 0.0,
                     max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                     request_id: str = "") -> vision_pb2.GenerateRequest:
    request = vision_pb2.GenerateRequest(
        request_id=request_id, image=image_input(image, image_id),
        prune=vision_pb2.PruneOptions(method=method, retention=retention),
        params=common_pb2.GenerationParams(max_new_tokens=max_new_tokens,
                                           temperature=temperature, top_p=top_p, seed=seed,
                                           stop=list(stop), ignore_eos=ignore_eos))
    if messages is not None:
        request.chat.messages.extend(common_pb2.ChatMessage(role=r, content=c)
                                     for r, c in messages)
    else:
        request.prompt = prompt or ""
    return request


def prune_request(image: ImageLike | None, question: str = "", *, image_id: str | None = None,
                  method: str = "", retention: float = 0.0, dtype: str = "float16",
                  request_id: str = "") -> vision_pb2.PruneRequest:
    return vision_pb2.PruneRequest(
        request_id=request_id, image=image_input(image, image_id), question=question,
        prune=vision_pb2.PruneOptions(method=method, retention=retention),
        dtype=DTYPE_NAMES[dtype])


def assemble_pruned(responses: list[vision_pb2.PruneResponse]
                    ) -> tuple[vision_pb2.Accepted, PackedTokens]:
    """Accepted info and packed tokens from a Prune response stream."""
    accepted, tokens = responses[0].accepted, responses[1].tokens
    assembler = ChunkAssembler(tokens.features)
    for response in responses[2:]:
        assembler.add(response.chunk)
    return accepted, packed_from_layout(tokens.layout, assembler.tensor())






def call_metadata(metadata: list[tuple[str, str]] | None, timeout: float | None
                  ) -> list[tuple[str, str]] | None:
    """`metadata` plus the deadline header when the call has a timeout (whole
    milliseconds, at least 1, at most the `MAX_TIMEOUT_MS` the service accepts)."""
    if timeout is None:
        return metadata
    ms = timeout * 1000
    value = max(1, int(ms)) if ms < MAX_TIMEOUT_MS else MAX_TIMEOUT_MS
    return [*(metadata or []), (TIMEOUT_HEADER, str(value))]


class VisionClient:
    """Blocking client. `target` and `token` (the API's bearer token) default to
    $HERO_TARGET and $HERO_API_TOKEN."""

    def __init__(self, target: str | None = None, *,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = (), token: str | None = None):
        target, token = connection(target, token)
        self.channel = (grpc.secure_channel(target, credentials, options=options)
                        if credentials else grpc.insecure_channel(target, options=options))
        self.stub = vision_pb2_grpc.VisionServiceStub(self.channel)
        self.metadata = bearer_metadata(token)

    def __enter__(self) -> VisionClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, image: ImageLike | None, prompt: str | None = None, *,
                 timeout: float | None = None, **options: Unpack[GenerateOptions]
                 ) -> Iterator[vision_pb2.GenerateEvent]:
        """Events: accepted, text deltas, usage. Raises a `services.sdk.errors.ApiError`."""
        try:
            yield from self.stub.Generate(generate_request(image, prompt, **options),
                                          timeout=timeout,
                                          metadata=call_metadata(self.metadata, timeout))
        except grpc.RpcError as exc:
            raise api_error(exc) from exc

    def prune(self, image: ImageLike | None, question: str = "", *,
              timeout: float | None = None, dtype: str = "float16",
              **options: Unpack[PruneOptions]) -> tuple[vision_pb2.Accepted, PackedTokens]:
        """The pruned tokens themselves, for clients that run their own LLM."""
        try:
            responses = list(self.stub.Prune(
                prune_request(image, question, dtype=dtype, **options), timeout=timeout,
                metadata=call_metadata(self.metadata, timeout)))
        except grpc.RpcError as exc:
            raise api_error(exc) from exc
        return assemble_pruned(responses)


class AsyncVisionClient(AsyncChannelClient):
    """asyncio client; `target` and `token` as for `VisionClient`."""

    def __init__(self, target: str | None = None, *,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = (), token: str | None = None):
        target, token = connection(target, token)
        super().__init__(target, credentials=credentials, options=options)
        self.stub = vision_pb2_grpc.VisionServiceStub(self.channel)
        self.metadata = bearer_metadata(token)

    async def generate(self, image: ImageLike | None, prompt: str | None = None, *,
                       timeout: float | None = None, **options: Unpack[GenerateOptions]
                       ) -> AsyncIterator[vision_pb2.GenerateEvent]:
        call = self.stub.Generate(generate_request(image, prompt, **options), timeout=timeout,
                                  metadata=call_metadata(self.metadata, timeout))
        try:
            async for event in call:
                yield event
        except grpc.RpcError as exc:
            raise api_error(exc) from exc
        finally:
            call.cancel()

    async def prune(self, image: ImageLike | None, question: str = "", *,
                    timeout: float | None = None, dtype: str = "float16",
                    **options: Unpack[PruneOptions]) -> tuple[vision_pb2.Accepted, PackedTokens]:
        call = self.stub.Prune(prune_request(image, question, dtype=dtype, **options),
                               timeout=timeout, metadata=call_metadata(self.metadata, timeout))
        try:
            return assemble_pruned([r async for r in call])
        except grpc.RpcError as exc:
            raise api_error(exc) from exc
