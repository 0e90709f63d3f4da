"""Typed errors of the Python clients, one per family of gRPC status.

Every one is also a `grpc.RpcError` with `code()` and `details()`, so code written
against plain grpc keeps working; `retryable` says whether the same call may succeed
later (with backoff).

    try:
        client.generate(...)
    except Overloaded:       # RESOURCE_EXHAUSTED: back off and retry
        ...
    except InvalidRequest as exc:  # INVALID_ARGUMENT: exc.details() says what to change
        ...
"""

from __future__ import annotations

import grpc


class ApiError(grpc.RpcError):
    """A call that ended with a status other than OK."""

    retryable = False

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"


class InvalidRequest(ApiError):
    """INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE: change the request."""


class NotFound(ApiError):
    """NOT_FOUND: e.g. an image id the service no longer has; send the image bytes."""


class Unauthenticated(ApiError):
    """UNAUTHENTICATED, PERMISSION_DENIED: send a valid token."""


class Overloaded(ApiError):
    """RESOURCE_EXHAUSTED: every place is taken (or the message is too large)."""

    retryable = True


class Unavailable(ApiError):
    """UNAVAILABLE: a service is down or restarting."""

    retryable = True


class DeadlineExceeded(ApiError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class Cancelled(ApiError):
    """CANCELLED: the call was cancelled."""


class ServerError(ApiError):
    """INTERNAL, UNKNOWN, UNIMPLEMENTED and the rest: a fault on the server's side."""


FAMILIES: dict[grpc.StatusCode, type[ApiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def api_error(exc: grpc.RpcError) -> ApiError:
    """The typed error for a failed call."""
    if isinstance(exc, ApiError):
        return exc
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    return FAMILIES.get(code, ServerError)(code, details)
