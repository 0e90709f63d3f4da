"""The pipeline's events (`accepted`, text `delta`s, `usage`) as OpenAI's answers.

Non-streaming: one `chat.completion`. Streaming: server-sent events, each a
`chat.completion.chunk`: the first carries `delta.role` and, as an extension, `hero`
(the image id, cache hit, visual tokens kept of total); then one chunk per text delta;
then one with `finish_reason`; with `stream_options.include_usage` a last chunk with
empty `choices` and `usage`; then `data: [DONE]`. A failure after the answer started
is sent as a `data: {"error": ...}` event before `[DONE]` (the status line is gone).

`usage` is OpenAI's (`prompt_tokens` counts the visual tokens the LLM prefilled) with
`usage.hero`: the Accepted figures plus the pipeline's `VisionUsage` (vision and queue
time, TTFT, bytes of tokens sent to the language service) and the language service's
prefill time and decode speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from hero.common.v1 import tensor_pb2 as common_pb2
from hero.vision.v1 import vision_pb2

from services.vision.openai.errors import describe
from services.vision.openai.images import image_id_url

FINISH_REASONS = {common_pb2.FINISH_REASON_LENGTH: "length"}
"""OpenAI's finish_reason per language-service reason; end of sequence and stop strings
are both "stop"."""
DONE = b"data: [DONE]\n\n"


def accepted_figures(accepted: vision_pb2.Accepted) -> dict[str, Any]:
    return {"image_id": accepted.image_id, "image_url": image_id_url(accepted.image_id),
            "cache_hit": accepted.cache_hit, "visual_tokens_kept": accepted.tokens_kept,
            "visual_tokens_total": accepted.tokens_total}


def response_headers(accepted: vision_pb2.Accepted) -> dict[str, str]:
    return {"x-hero-image-id": accepted.image_id,
            "x-hero-cache-hit": "true" if accepted.cache_hit else "false",
            "x-hero-visual-tokens": f"{accepted.tokens_kept}/{accepted.tokens_total}"}


def usage_object(accepted: vision_pb2.Accepted, usage: vision_pb2.VisionUsage
                 ) -> dict[str, Any]:
    language = usage.language
    return {"prompt_tokens": language.prompt_tokens,
            "completion_tokens": language.completion_tokens,
            "total_tokens": language.prompt_tokens + language.completion_tokens,
            "hero": {**accepted_figures(accepted),
                     "visual_embeddings": language.visual_tokens,
                     "vision_ms": usage.vision_ms, "queue_ms": usage.queue_ms,
                     "ttft_ms": usage.ttft_ms, "prefill_ms": language.prefill_ms,
                     "decode_tokens_per_s": language.decode_tokens_per_s,
                     "bytes_sent": usage.bytes_sent}}


def finish_reason(usage: vision_pb2.VisionUsage | None) -> str:
    if usage is None:
        return "stop"
    return FINISH_REASONS.get(usage.language.finish_reason, "stop")


@dataclasses.dataclass
class Answer:
    """One request's answer: its identity and the Accepted event that began it."""

    request_id: str
    model: str
    accepted: vision_pb2.Accepted
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return f"chatcmpl-{self.request_id}"

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def completion(self, text: str, usage: vision_pb2.VisionUsage | None) -> dict[str, Any]:
        """The non-streaming answer."""
        return {**self._base("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish_reason(usage)}],
                "usage": usage_object(self.accepted, usage) if usage is not None else None,
                "hero": accepted_figures(self.accepted)}

    def chunk(self, delta: dict[str, Any], finish: str | None = None,
              **extra: Any) -> bytes:
        """One server-sent event carrying a chunk with one choice."""
        return self.event({**self._base("chat.completion.chunk"),
                           "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": finish}], **extra})

    def usage_chunk(self, usage: vision_pb2.VisionUsage) -> bytes:
        return self.event({**self._base("chat.completion.chunk"), "choices": [],
                           "usage": usage_object(self.accepted, usage)})

    @staticmethod
    def event(data: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class Events(Protocol):
    """The pipeline's events as the writers below take them: iterated, then closed."""

    def __aiter__(self) -> AsyncIterator[vision_pb2.GenerateEvent]: ...

    async def aclose(self) -> None: ...


async def collect(events: Events
                  ) -> tuple[str, vision_pb2.VisionUsage | None]:
    """The whole text and the usage of the events after Accepted."""
    text, usage = [], None
    async with contextlib.aclosing(events):
        async for event in events:
            if event.WhichOneof("event") == "delta":
                text.append(event.delta.text)
            elif event.WhichOneof("event") == "usage":
                usage = event.usage
    return "".join(text), usage


async def stream(answer: Answer, events: Events,
                 include_usage: bool, ended: Callable[[str], None]) -> AsyncIterator[bytes]:
    """The server-sent events of a streaming answer; `ended(code name)` is called once
    with OK or the failure's code (not when the client went away: a cancel). Closing
    this closes `events` (and with them the language call)."""
    usage = None
    async with contextlib.aclosing(events):
        yield answer.chunk({"role": "assistant", "content": ""},
                           hero=accepted_figures(answer.accepted))
        try:
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "delta" and event.delta.text:
                    yield answer.chunk({"content": event.delta.text})
                elif kind == "usage":
                    usage = event.usage
        except Exception as exc:  # the status line has been sent: an error event instead
            _, _, body, name = describe(exc, answer.request_id)
            ended(name)
            yield b"data: " + body + b"\n\n" + DONE
            return
    yield answer.chunk({}, finish_reason(usage))
    if include_usage and usage is not None:
        yield answer.usage_chunk(usage)
    ended("OK")
    yield DONE
