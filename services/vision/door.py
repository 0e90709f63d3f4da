"""What the ingress checks of a call before any work: its metadata and every field a client
fills in, each against a named limit.

The order is fixed: the bearer token first (`UNAUTHENTICATED`), then the metadata the
service reads (`hero-timeout-ms`), then the request's fields; each failure is an
`InvalidInputError` naming the field and its limit, mapped to `INVALID_ARGUMENT` by
`services.common.errors.status_for`. Fields bounded here or by the checks these call:

| field | limit |
|---|---|
| `request_id` | `MAX_REQUEST_ID_CHARS` printable ASCII characters |
| `image.data`, `image.image_id` | `max_image_bytes`; a 64-hex-digit id (`tokens.py`) |
| `prune.method` | `MAX_METHOD_CHARS`, then a known method |
| `prune.retention` | (0, 1], 0 = the default |
| `prompt`, `question`, `chat.messages[].content` | `max_prompt_chars` in all |
| `chat.messages` | `MAX_MESSAGES` turns, each role at most `MAX_ROLE_CHARS` |
| `params` | `max_new_tokens`, temperature, top_p, at most 8 `stop` strings of 64 chars |
| `dtype` (Prune) | float32, float16, bfloat16 or int8 |
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hero.common.v1 import tensor_pb2 as common_pb2
from hero.vision.v1 import vision_pb2

from hero_core.errors import InvalidInputError
from services.common.codec import DTYPE_NAMES
from services.common.errors import DeadlineError
from services.common.params import (
    check_generation_params,
    request_id_of,
    timeout_ms_of,
    turns_of,
)
from services.vision.api import MalformedRequest
from services.vision.config import VisionConfig

MAX_METHOD_CHARS = 64
"""Longest pruning method name (the known ones are much shorter)."""
MAX_NEW_TOKENS_AT_DOOR = 1 << 20
"""A bound on max_new_tokens before the language service applies its own limit."""

Turns = tuple[tuple[str, str], ...]


def metadata_pairs(grpc_context: Any) -> list[tuple[str, Any]]:
    """The call's metadata as (key, value) pairs, repeated keys kept (none outside a gRPC
    call, e.g. in tests)."""
    if grpc_context is None:
        return []
    return [(str(key), value) for key, value in grpc_context.invocation_metadata() or ()]


def deadline_of(metadata: list[tuple[str, Any]]) -> float | None:
    """The client's deadline on the `time.monotonic()` clock, from the `hero-timeout-ms`
    metadata the SDK sends (Serve's proxy does not pass gRPC deadlines on);
    `InvalidInputError` for a value that is not one."""
    timeout_ms = timeout_ms_of(metadata)
    return None if timeout_ms is None else time.monotonic() + timeout_ms / 1000


def parsed(request: Any) -> Any:
    """`request`, or `InvalidInputError` when its bytes did not parse."""
    if isinstance(request, MalformedRequest):
        raise InvalidInputError(request.problem())
    return request


def check_method(options: vision_pb2.PruneOptions) -> None:
    if len(options.method) > MAX_METHOD_CHARS:
        raise InvalidInputError(f"prune.method is {len(options.method)} characters, above the "
                                f"limit of {MAX_METHOD_CHARS}; name a pruning method")


def check_generate(request: vision_pb2.GenerateRequest, config: VisionConfig) -> Turns:
    """The request's (role, text) turns, once every field is within its limit."""
    request_id_of(request.request_id)
    check_method(request.prune)
    which = request.WhichOneof("input")
    turns = turns_of(request.prompt if which == "prompt" else None,
                     list(request.chat.messages) if which == "chat" else None,
                     config.max_prompt_chars)
    check_generation_params(request.params, MAX_NEW_TOKENS_AT_DOOR)
    return turns


def check_prune(request: vision_pb2.PruneRequest, config: VisionConfig) -> int:
    """The dtype to send the features in, once every field is within its limit."""
    request_id_of(request.request_id)
    check_method(request.prune)
    if len(request.question) > config.max_prompt_chars:
        turns_of(request.question, None, config.max_prompt_chars)
    dtype: int = request.dtype or common_pb2.DTYPE_FLOAT16
    if dtype not in DTYPE_NAMES.values():
        raise InvalidInputError(f"dtype {dtype} is not one of float32, float16, bfloat16, "
                                "int8")
    return dtype


def check_deadline(deadline: float | None) -> None:
    """`DeadlineError` when the client's deadline has already passed (a timeout of 0)."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineError("the deadline passed before the request could start; send a "
                            "longer hero-timeout-ms")


def ended_by_deadline(deadline: float | None) -> bool:
    """Whether a `CancelledError` that reached the RPC is its deadline's doing, not a cancel
    of the call: the deadline has passed and nobody is cancelling this task. (grpc.aio
    raises one from a language call whose deadline passes while the request stream is
    being closed, a local cancel of its own.)"""
    task = asyncio.current_task()
    return (deadline is not None and time.monotonic() >= deadline
            and not (task is not None and task.cancelling()))
