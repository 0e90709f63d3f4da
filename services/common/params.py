"""Checks of request fields shared by both services (limits, prompts, parameters)."""

from __future__ import annotations

from hero.common.v1 import tensor_pb2 as common_pb2

from hero_core.errors import InvalidInputError, PromptTooLongError

TIMEOUT_HEADER = "hero-timeout-ms"
"""Metadata carrying a call's deadline to the vision service. Serve's gRPC proxy does not
forward gRPC deadlines to the replicas (and does not always cancel them when one passes),
so clients send it here too; the service then bounds its language call by it."""


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
             max_messages: int = 64) -> tuple[tuple[str, str], ...]:
    """(role, text) turns from a prompt or chat messages, with size checks."""
    if chat is not None:
        if len(chat) > max_messages:
            raise InvalidInputError(f"at most {max_messages} chat messages are accepted")
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
