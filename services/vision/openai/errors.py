"""Failures as OpenAI's error object with the HTTP status its clients expect.

One map from the service's status codes (`services.common.errors.status_for`, the same
as the gRPC API's) to HTTP, so both front ends say the same thing about one failure:

| gRPC status | HTTP | `error.type` |
|---|---|---|
| INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE | 400 | `invalid_request_error` |
| UNAUTHENTICATED | 401 | `authentication_error` |
| PERMISSION_DENIED | 403 | `permission_error` |
| NOT_FOUND | 404 | `not_found_error` |
| (a body without a Content-Length) | 411 | `invalid_request_error` |
| (a body over the limit) | 413 | `invalid_request_error` |
| RESOURCE_EXHAUSTED | 429, `Retry-After` | `rate_limit_error` |
| UNAVAILABLE | 503, `Retry-After` | `service_unavailable_error` |
| DEADLINE_EXCEEDED | 504 | `timeout_error` |
| anything else | 500 | `server_error` (message: the request id only) |

`error.code` is the gRPC status name in lower case (`not_found`, `resource_exhausted`,
...), or `length_required`, `request_too_large`, `model_not_found`, `unknown_url`,
`method_not_allowed`.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from starlette.responses import Response

from hero_core.errors import HeroError
from services.common.errors import NotFoundError, public_details, status_for

RETRY_AFTER_S = 1
"""`Retry-After` of an overload or unavailable answer (OpenAI's clients honour it)."""

HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


class HttpError(HeroError):
    """A failure of the HTTP exchange itself, with its own status and code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.status, self.code, str(self))


class ModelNotFoundError(NotFoundError):
    """A request named a model this deployment does not serve (404, as OpenAI answers)."""


def body_too_large(limit: int, size: int | None = None) -> HttpError:
    said = f"{size} bytes" if size is not None else "more than that"
    return HttpError(413, "request_too_large",
                     f"the request body is {said}; this endpoint reads at most {limit} "
                     "bytes (max_image_bytes as base64 plus the prompt)")


def error_body(message: str, kind: str, code: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param,
                                 "code": code}}).encode()


def describe(exc: BaseException, request_id: str) -> tuple[int, dict[str, str], bytes, str]:
    """(HTTP status, headers, body, gRPC-style code name for metrics) for `exc`."""
    param = getattr(exc, "param", None)
    if isinstance(exc, HttpError):
        status, kind, code = exc.status, "invalid_request_error", exc.code
        message, name = public_details(str(exc)), f"HTTP_{status}"
    else:
        grpc_code, message = status_for(exc, request_id)
        status, kind = HTTP_STATUS.get(grpc_code, (500, "server_error"))
        code = ("model_not_found" if isinstance(exc, ModelNotFoundError)
                else grpc_code.name.lower())
        name = grpc_code.name
    headers = {}
    if status in (429, 503):
        headers["retry-after"] = str(RETRY_AFTER_S)
    return status, headers, error_body(message, kind, code, param), name


def error_response(exc: BaseException, request_id: str,
                   extra_headers: dict[str, str] | None = None) -> tuple[Response, str]:
    """The JSON error answer for `exc`, and its code name for the request counter."""
    status, headers, body, name = describe(exc, request_id)
    return Response(body, status_code=status, media_type="application/json",
                    headers={**headers, **(extra_headers or {})}), name
