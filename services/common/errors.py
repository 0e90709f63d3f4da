"""Exceptions -> gRPC status codes, in one place, for both services (`status_for`).

Bad input -> INVALID_ARGUMENT, something unknown here -> NOT_FOUND, missing credentials
-> UNAUTHENTICATED, overload -> RESOURCE_EXHAUSTED, dependency down or draining ->
UNAVAILABLE, deadline -> DEADLINE_EXCEEDED, another service's own verdict
(`UpstreamError`) -> its code; anything else is INTERNAL with the request id logged,
never the exception text (it may hold internals).
"""

from __future__ import annotations

import logging
import re

import grpc

from hero_core.errors import HeroError, InvalidInputError

log = logging.getLogger("hero.errors")


class OverloadedError(HeroError):
    """Every slot and queue place is taken; the client should back off and retry."""


class UnavailableError(HeroError):
    """A dependency is down or the server is draining."""


class UnauthenticatedError(HeroError):
    """No or a wrong bearer token on an endpoint that requires one."""


class DeadlineError(HeroError):
    """The request's deadline passed before it finished."""


class NotFoundError(HeroError):
    """Something the request names is not known here (an image id, a health service)."""


class UpstreamError(HeroError):
    """Another service's status for this request, passed on with its code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def __reduce__(self) -> tuple[object, ...]:  # Ray pickles it from replica to proxy
        return type(self), (self.code, self.message)


STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
]


_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")
_CLASS = re.compile(r"<class '([\w.]+)'>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")


def public_details(message: str, limit: int = 1024) -> str:
    """`message` fit for a client: object reprs and heap addresses replaced by type
    names, and at most `limit` characters."""
    message = _ADDRESS.sub("0x…", _CLASS.sub(r"\1", _REPR.sub(r"\1", message)))
    return message if len(message) <= limit else message[:limit - 1] + "…"


def status_for(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for `exc`."""
    if isinstance(exc, UpstreamError):
        return exc.code, public_details(exc.message)
    for cls, code in STATUS:
        if isinstance(exc, cls):
            return code, public_details(str(exc))
    log.error("request %s failed", request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
