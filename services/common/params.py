"""Checks of request fields shared by both services (limits, prompts, parameters)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import Any

from hero.common.v1 import tensor_pb2 as common_pb2

from hero_core.errors import InvalidInputError, PromptTooLongError

TIMEOUT_HEADER = "hero-timeout-ms"
"""Metadata carrying a call's deadline to the vision service. Serve's gRPC proxy does not
forward gRPC deadlines to the replicas, so clients send it here too; the service then
bounds its language call by it."""
MAX_TIMEOUT_MS = 86_400_000
"""Largest `hero-timeout-ms` accepted (one day); the SDK sends at most this."""
MAX_REQUEST_ID_CHARS = 128
"""Longest caller-chosen request id (printable ASCII, as it goes into logs)."""
MAX_ROLE_CHARS = 16
"""Longest chat role ("system", "user" and "assistant" are the roles there are)."""
MAX_MESSAGES = 64
"""Most chat turns in one request (the language service's default `max_messages`)."""

_TIMEOUT_MS = re.compile(r"[0-9]{1,8}")
_REQUEST_ID = re.compile(r"[\x20-\x7e]*")


def timeout_ms_of(metadata: Sequence[tuple[str, Any]]) -> int | None:
    """The `hero-timeout-ms` value among a call's metadata pairs (None when absent), or
    `InvalidInputError` saying what to send: one decimal integer of ASCII digits in
    0..MAX_TIMEOUT_MS. Any value is safe to pass: huge, negative, fractional, non-ASCII,
    binary or repeated."""
    values = [value for key, value in metadata if key == TIMEOUT_HEADER]
    if not values:
        return None
    expected = (f"send {TIMEOUT_HEADER} once, as the call's timeout in whole milliseconds "
                f"(ASCII digits, 0..{MAX_TIMEOUT_MS})")
    if len(values) > 1:
        raise InvalidInputError(f"{TIMEOUT_HEADER} was sent {len(values)} times; {expected}")
    value = values[0]
    if not (isinstance(value, str) and _TIMEOUT_MS.fullmatch(value)
            and int(value) <= MAX_TIMEOUT_MS):
        raise InvalidInputError(f"{TIMEOUT_HEADER} {_shown(value)} is not valid; {expected}")
    return int(value)


def _shown(value: Any, limit: int = 24) -> str:
    """`value` for an error message: its start, quoted, or its type."""
    if not isinstance(value, (str, bytes)):
        return type(value).__name__
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


def request_id_of(given: str) -> str:
    """A caller's request id, or a new one when it left the field empty;
    `InvalidInputError` past MAX_REQUEST_ID_CHARS or outside printable ASCII."""
    if len(given) > MAX_REQUEST_ID_CHARS:
        raise InvalidInputError(f"request_id is {len(given)} characters, above the limit of "
                                f"{MAX_REQUEST_ID_CHARS}; send a shorter one or none")
    if not _REQUEST_ID.fullmatch(given):
        raise InvalidInputError("request_id must be printable ASCII (at most "
                                f"{MAX_REQUEST_ID_CHARS} characters); send another or none")
    return given or uuid.uuid4().hex


def loggable_request_id(given: str) -> str:
    """The caller's request id if it is valid, else a new one: what logs and errors name
    before (or when) the request is checked."""
    try:
        return request_id_of(given)
    except InvalidInputError:
        return uuid.uuid4().hex


def check_generation_params(params: common_pb2.GenerationParams, max_new_tokens: int,
                            max_stop_strings: int = 8, max_stop_chars: int = 64) -> None:
    """Raise `InvalidInputError` naming the first parameter out of range."""
    if not 1 <= params.max_new_tokens <= max_new_tokens:
        raise InvalidInputError(f"max_new_tokens must be in 1..{max_new_tokens}, got "
                                f"{params.max_new_tokens}")
    if not 0.0 <= params.temperature <= 2.0:
        raise InvalidInputError(f"temperature must be in [0, 2], got {params.temperature:g}")
    if not 0.0 <= params.top_p <= 1.0:
        raise InvalidInputError(f"top_p must be in (0, 1] (0 = off), got {params.top_p:g}")
    if len(params.stop) > max_stop_strings or any(
            not 0 < len(s) <= max_stop_chars for s in params.stop):
        raise InvalidInputError(f"stop takes at most {max_stop_strings} non-empty strings "
                                f"of at most {max_stop_chars} characters")


def seed_of(params: common_pb2.GenerationParams) -> int | None:
    """The request's sampler seed, or None when it sent none (fresh randomness)."""
    return int(params.seed) if params.HasField("seed") else None


def turns_of(prompt: str | None, chat: list[common_pb2.ChatMessage] | None, max_chars: int,
             max_messages: int = MAX_MESSAGES) -> tuple[tuple[str, str], ...]:
    """(role, text) turns from a prompt or chat messages, with size checks."""
    if chat is not None:
        if len(chat) > max_messages:
            raise InvalidInputError(f"chat has {len(chat)} messages; at most {max_messages} "
                                    "are accepted")
        for index, message in enumerate(chat):
            if len(message.role) > MAX_ROLE_CHARS:
                raise InvalidInputError(
                    f"chat.messages[{index}].role is {len(message.role)} characters, above "
                    f"the limit of {MAX_ROLE_CHARS}; use system, user or assistant")
        turns = tuple((m.role, m.content) for m in chat)
    elif prompt is not None:
        turns = (("user", prompt),)
    else:
        raise InvalidInputError("send a prompt or chat messages")
    chars = sum(len(text) for _, text in turns)
    if chars > max_chars:
        raise PromptTooLongError(f"prompt is {chars} characters, above max_prompt_chars="
                                 f"{max_chars}; shorten it")
    if not any(text.strip() for role, text in turns if role == "user"):
        raise InvalidInputError("the prompt is empty; ask a question")
    return turns
