"""Python client of hero.language.v1.LanguageService (asyncio and blocking).

    async with LanguageClient("127.0.0.1:50052") as client:
        params = common_pb2.GenerationParams(max_new_tokens=64)
        async for part in client.generate(packed, "What is shown?", params=params):
            ...  # common_pb2.TextDelta, then a final common_pb2.Usage

Failures raise the typed errors of `services.sdk.errors` (`InvalidRequest`,
`Unavailable`, ...), each a `grpc.RpcError` with the server's code and details.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import Any, TypeAlias

import grpc
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.language.v1 import language_pb2, language_pb2_grpc

from hero_core.packing import PackedTokens
from services.common.auth import bearer_metadata
from services.common.codec import DTYPE_NAMES, MAX_CHUNK_BYTES, packed_messages
from services.sdk.channel import AsyncChannelClient
from services.sdk.errors import ApiError, api_error

Part: TypeAlias = common_pb2.TextDelta | common_pb2.Usage


def generate_requests(packed: PackedTokens, header: language_pb2.GenerateHeader, dtype: str,
                      chunk_bytes: int) -> Iterator[language_pb2.GenerateRequest]:
    """The request stream of one Generate call: header, tokens, chunks."""
    layout, tensor, chunks = packed_messages(packed, DTYPE_NAMES[dtype], chunk_bytes)
    yield language_pb2.GenerateRequest(header=header)
    yield language_pb2.GenerateRequest(tokens=language_pb2.VisualTokens(layout=layout,
                                                                          features=tensor))
    for chunk in chunks:
        yield language_pb2.GenerateRequest(chunk=chunk)


def past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def broken_stream(deadline: float | None) -> ApiError:
    """The status of a Generate call that grpc.aio cancelled itself.

    grpc.aio cancels a call when sending its request stream fails (its deadline passed, or
    the connection broke, while the last chunk or the half-close was being sent); the
    read then raises `CancelledError` although nobody cancelled the caller, or INTERNAL
    "Internal error from Core" when the deadline passed while chunks were still queued.
    This is the status that stands for: DEADLINE_EXCEEDED past `deadline`, else
    UNAVAILABLE.
    """
    if past(deadline):
        code, details = grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
    else:
        code, details = (grpc.StatusCode.UNAVAILABLE,
                         "the request stream broke before it was sent; retry")
    return api_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                          details))


DEFAULT_PARAMS = common_pb2.GenerationParams(max_new_tokens=64)
"""Greedy decoding of at most 64 tokens."""


def make_header(prompt: str | None, messages: Sequence[tuple[str, str]] | None,
                request_id: str, params: common_pb2.GenerationParams | None = None
                ) -> language_pb2.GenerateHeader:
    """A Generate (or Validate) header: the prompt or chat, and `params` as they are."""
    header = language_pb2.GenerateHeader(request_id=request_id or uuid.uuid4().hex,
                                         params=params or DEFAULT_PARAMS)
    if messages is not None:
        header.chat.messages.extend(common_pb2.ChatMessage(role=r, content=c)
                                    for r, c in messages)
    else:
        header.prompt = prompt or ""
    return header


class LanguageClient(AsyncChannelClient):
    """Async client; one channel, many concurrent calls. Failures raise the typed errors
    of `services.sdk.errors`."""

    def __init__(self, target: str, *, credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = (), token: str | None = None):
        super().__init__(target, credentials=credentials, options=options)
        self.stub = language_pb2_grpc.LanguageServiceStub(self.channel)
        self.metadata = bearer_metadata(token)

    async def wait_ready(self, timeout: float) -> bool:
        """Whether the channel connects within `timeout` seconds (it tries now)."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:
            return False
        return True

    async def model_info(self, timeout: float | None = None) -> language_pb2.ModelInfo:
        try:
            return await self.stub.GetModelInfo(language_pb2.GetModelInfoRequest(),
                                                timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise api_error(exc) from exc

    async def validate(self, prompt: str | None = None, *,
                       messages: Sequence[tuple[str, str]] | None = None,
                       params: common_pb2.GenerationParams | None = None,
                       request_id: str = "", timeout: float | None = None) -> None:
        """Whether the server would take this prompt and these parameters: returns, or
        raises the typed error (`InvalidRequest` saying what to change)."""
        header = make_header(prompt, messages, request_id, params)
        try:
            await self.stub.Validate(header, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise api_error(exc) from exc

    async def generate(self, packed: PackedTokens, prompt: str | None = None, *,
                       messages: Sequence[tuple[str, str]] | None = None,
                       params: common_pb2.GenerationParams | None = None,
                       request_id: str = "", dtype: str = "float16",
                       timeout: float | None = None,
                       chunk_bytes: int = MAX_CHUNK_BYTES) -> AsyncGenerator[Part, None]:
        """Stream one generation: `TextDelta`s, then one `Usage`.

        Raises the typed error of the server's status on failure; breaking out of the
        loop cancels the call and frees the server's slot.
        """
        header = make_header(prompt, messages, request_id, params)
        deadline = None if timeout is None else time.monotonic() + timeout
        call = self.stub.Generate(generate_requests(packed, header, dtype, chunk_bytes),
                                  timeout=timeout, metadata=self.metadata)
        try:
            while True:
                try:
                    response = await call.read()
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # this task is being cancelled: the call goes with it
                    raise broken_stream(deadline) from None
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.INTERNAL and past(deadline):
                        # grpc.aio's answer when the deadline passes while the request
                        # stream is still being written: "Internal error from Core"
                        raise broken_stream(deadline) from None
                    raise api_error(exc) from exc
                if response is grpc.aio.EOF:
                    return
                yield getattr(response, response.WhichOneof("part"))
        finally:
            call.cancel()


class SyncLanguageClient:
    """Blocking wrapper of `LanguageClient` for scripts and notebooks."""

    def __init__(self, target: str, **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self._client = self._loop.run_until_complete(self._make(target, kwargs))

    @staticmethod
    async def _make(target: str, kwargs: dict[str, Any]) -> LanguageClient:
        return LanguageClient(target, **kwargs)

    def generate(self, packed: PackedTokens, prompt: str | None = None, *,
                 dtype: str = "float16", timeout: float | None = None,
                 **params: Any) -> list[Part]:
        """All parts of one generation (deltas then usage); `params`: fields of
        `common_pb2.GenerationParams` (max_new_tokens, temperature, ...)."""
        message = common_pb2.GenerationParams(**{**{"max_new_tokens": 64}, **params})

        async def collect() -> list[Part]:
            return [p async for p in self._client.generate(packed, prompt, params=message,
                                                           dtype=dtype, timeout=timeout)]
        return self._loop.run_until_complete(collect())

    def close(self) -> None:
        self._loop.run_until_complete(self._client.close())
        self._loop.close()
